"""Optional integrations with other frameworks; each module imports its framework on import.

``resu_compile.integrations.transformers``: :class:`ResuCallback` for the HF ``Trainer``
(``pip install "resu-compile[hf]"``).
"""
