"""Triton kernels (optional: every kernel has a pure-torch twin it is tested against)."""
