"""Benchmarks: scripts that print a table and write JSON (run on the GPU machine)."""
