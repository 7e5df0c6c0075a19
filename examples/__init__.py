"""Examples of resu-compile, installed as ``resu_examples``."""
