"""Build script: the C++ CPU extension always, its CUDA kernels when a CUDA toolkit is found.

- CPU: ``fastgrpo._C`` = ``csrc/ops.cpp`` (schemas) + ``csrc/cpu/*.cpp``, with AVX-512 or AVX2/FMA code when the
  build host has them (``FASTGRPO_CPU_ARCH=avx512|avx2|default`` overrides); built for the machine it runs on.
- CUDA: ``fastgrpo._C_cuda``, a separate module = ``csrc/cuda/*.cpp`` + the ``csrc/cuda/*.cu`` objects compiled by
  nvcc, when ``CUDA_HOME`` or ``nvcc`` on PATH is found; decided by the toolkit, never by
  ``torch.cuda.is_available()``, so CPU-only machines (like CI's) compile the CUDA code too. It links the CUDA
  runtime dynamically (``libcudart.so.<major>``): in a process where torch has already loaded its own runtime of
  that major version, that one is used, so the extension asks no newer driver than torch does. A toolkit whose
  major version differs from ``torch.version.cuda`` gets a build-time warning (the module would then need that
  other runtime and its driver); ``import fastgrpo`` never depends on it: the CPU ops live in ``_C``, and a
  ``_C_cuda`` that cannot load only makes ``backend="cuda"`` unavailable, with the loader's reason.
  ``FASTGRPO_CUDA_ARCHS`` (default ``80;90a``) lists the architectures; ``FASTGRPO_NO_CUDA=1`` skips CUDA.
- ``FASTGRPO_NO_EXTENSION=1`` builds nothing: the reference and Triton paths need no extension.
- Build with ``pip install --no-build-isolation``: the extension must be compiled against the torch it will
  load into (an isolated build would fetch another one, or have none and skip the extension).
"""

import glob
import os
import re
import shutil
import subprocess
import warnings

from setuptools import setup


def cpu_arch_flags():
    arch = os.environ.get("FASTGRPO_CPU_ARCH")
    if arch is None:
        try:
            flags = open("/proc/cpuinfo").read()
        except OSError:
            flags = ""
        has = lambda *names: all(f" {n}" in flags for n in names)  # noqa: E731
        arch = (
            "avx512"
            if has("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma")
            else "avx2"
            if has("avx2", "fma")
            else "default"
        )
    if arch == "avx512":
        return [
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
            "-mf16c",
            "-DCPU_CAPABILITY=AVX512",
            "-DCPU_CAPABILITY_AVX512",
        ]
    if arch == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def cuda_home():
    """The toolkit root: CUDA_HOME / CUDA_PATH, the one holding the nvcc on PATH, or /usr/local/cuda."""
    if os.environ.get("FASTGRPO_NO_CUDA") == "1":
        return None
    nvcc = shutil.which("nvcc")
    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None,
        "/usr/local/cuda",
    ]
    for home in candidates:
        if home and all(os.path.exists(os.path.join(home, *p)) for p in (("bin", "nvcc"), ("include", "cuda.h"))):
            return home
    return None


# the code-generation flags of every .cu; `python -m fastgrpo static` compiles with the same (tests/test_static.py)
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]


def compile_cuda(home, build_dir):
    """nvcc each .cu into a position-independent object; returns the object paths."""
    archs = os.environ.get("FASTGRPO_CUDA_ARCHS", "80;90a").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    os.makedirs(build_dir, exist_ok=True)
    objects = []
    for src in sorted(glob.glob("csrc/cuda/*.cu")):
        obj = os.path.join(build_dir, os.path.basename(src) + ".o")
        cmd = [
            os.path.join(home, "bin", "nvcc"),
            "-c",
            src,
            "-o",
            obj,
            *NVCC_FLAGS,
            "-Xcompiler",
            "-fPIC",
            *gencode,
        ]
        print(" ".join(cmd))
        subprocess.check_call(cmd)
        objects.append(obj)
    return objects


def nvcc_major(home):
    out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.", out)
    return int(found.group(1)) if found else None


def torch_cuda_version():
    import torch

    return torch.version.cuda


def warn_on_runtime_mismatch(home):
    """The module needs libcudart.so.<nvcc major>: say so when torch brings another runtime."""
    major = nvcc_major(home)
    torch_cuda = torch_cuda_version()
    if torch_cuda is None:
        warnings.warn(
            f"fastgrpo: compiling the CUDA kernels with CUDA {major} for a CPU-only torch: they are built "
            "and checked, but run only with a CUDA build of torch whose CUDA major version is "
            f"{major}",
            stacklevel=1,
        )
    elif major is not None and int(torch_cuda.split(".")[0]) != major:
        warnings.warn(
            f"fastgrpo: nvcc is CUDA {major} but torch uses CUDA {torch_cuda}: fastgrpo._C_cuda will need "
            f"libcudart.so.{major} and a driver for CUDA {major}; build with the toolkit matching "
            f"torch (CUDA_HOME=...) or FASTGRPO_NO_CUDA=1",
            stacklevel=1,
        )


def stream_native_handle():
    """Whether this torch's c10::Stream has native_handle() (newer torch); else the bindings reach the CUDA stream
    through c10_cuda, which only a CUDA build of torch has."""
    import torch.utils.cpp_extension as cpp

    header = os.path.join(cpp.include_paths()[0], "c10", "core", "Stream.h")
    return os.path.exists(header) and "native_handle()" in open(header).read()


def extensions():
    if os.environ.get("FASTGRPO_NO_EXTENSION") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # an isolated build environment without torch: install --no-build-isolation instead
        print(
            "fastgrpo: torch is not importable at build time, building without the C++/CUDA extension "
            "(pip install --no-build-isolation -e . builds it against the installed torch)"
        )
        return [], {}

    # -fopenmp: at::parallel_for is header code, parallel only where the extension itself is built with OpenMP
    cxx = ["-O3", "-std=c++17", "-fopenmp", *cpu_arch_flags()]
    exts = [
        CppExtension(
            "fastgrpo._C",
            ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    home = cuda_home()
    native_handle = home is not None and stream_native_handle()
    if home and not native_handle and torch_cuda_version() is None:
        print(
            "fastgrpo: this CPU-only torch has no c10::Stream::native_handle (torch < 2.7?): skipping the CUDA kernels"
        )
        home = None
    if home:
        warn_on_runtime_mismatch(home)
        lib = os.path.join(home, "lib64") if os.path.isdir(os.path.join(home, "lib64")) else os.path.join(home, "lib")
        exts.append(
            CppExtension(
                "fastgrpo._C_cuda",
                sorted(glob.glob("csrc/cuda/*.cpp")),
                extra_compile_args={"cxx": ["-O3", "-std=c++17"]},
                extra_objects=compile_cuda(home, os.path.join("build", "cuda_objects")),
                define_macros=[("FASTGRPO_STREAM_NATIVE_HANDLE", None)] if native_handle else [],
                include_dirs=[os.path.join(home, "include")],
                library_dirs=[lib],
                libraries=["cudart"] if native_handle else ["cudart", "c10_cuda"],
                # the toolkit's runtime as the fallback; a runtime of the same major torch loaded already is used first
                extra_link_args=[f"-Wl,-rpath,{lib}"],
            )
        )
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
