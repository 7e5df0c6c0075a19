"""The RESU rules of METHOD.md as pure functions on tensors.

Nothing here knows about FX, Dynamo or optimizers: the runtime calls these functions between steps.
"""
