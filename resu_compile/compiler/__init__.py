"""The compiler: the torch.compile backend "resu", which controller owns which model, and
the FX passes (match the weights, rewrite the graph variants)."""
