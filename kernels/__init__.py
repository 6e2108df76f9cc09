"""Triton kernels of fastgrpo, installed as ``fastgrpo.kernels``.

Each module holds one op's kernels and their typed launchers; registration, autograd and the public
functions live in ``fastgrpo`` itself. Importing this package imports no Triton code.
"""
