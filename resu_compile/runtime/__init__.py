"""The runtime: the controller (phase and schedule), one schedule per method, the transitions
and the checkpoints of a RESU run."""
