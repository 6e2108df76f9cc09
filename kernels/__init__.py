"""Triton kernels of fastgrpo, installed as ``fastgrpo.kernels``.

Each module holds one op's kernels and their launch table (block size, warps, the ahead-of-time
specializations); ``params.py`` names every positional parameter of the ops. The launchers, registration,
autograd and public function of an op live in its module of ``fastgrpo.reward`` / ``fastgrpo.trajectory``.
Importing this package imports no Triton code.
"""
