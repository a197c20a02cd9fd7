"""Build ann_kernels and its C++/CUDA extension ``ann_kernels._C``.

Environment switches (all prefixed ``ANN_KERNELS_``):

- ``ANN_KERNELS_SKIP_EXT=1``   build/install the pure-Python package only (every op then
                                runs through its pure-torch reference, with a warning).
- ``ANN_KERNELS_NO_CUDA=1``    never compile the CUDA sources, even with a CUDA torch + nvcc.
- ``ANN_KERNELS_DEBUG=1``      compile with ``-O0 -g`` instead of ``-O3``.
- ``ANN_KERNELS_MAX_JOBS=N``   parallel compile jobs (default: ``os.cpu_count()``).
- ``ANN_KERNELS_MARCH=ARCH``   ``-march`` of the CPU kernels (default ``native``: the vector
                                width of the build machine, AVX2 here; use ``x86-64`` or
                                ``x86-64-v3`` for a binary that runs on other machines).

The CPU sources are always compiled (OpenMP + compiler-vectorised row loops).
CUDA sources (``csrc/cuda/*.cu``) are added only when torch was built with CUDA and
``nvcc`` is found. Build against the installed torch with
``pip install --no-build-isolation -e .``.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(f"ANN_KERNELS_{name}", "0") not in ("", "0", "false", "False")


def _extensions():
    if _flag("SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", os.environ.get("ANN_KERNELS_MAX_JOBS", str(os.cpu_count() or 1)))
    opt = ["-O0", "-g"] if _flag("DEBUG") else ["-O3"]
    march = os.environ.get("ANN_KERNELS_MARCH", "native")
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 for
    # torch <= 2.13's headers, C++20 required from 2.14; it passes -std=c++20 to g++ and nvcc).
    cxx_flags = opt + [f"-march={march}", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    use_cuda = (not _flag("NO_CUDA")) and torch.version.cuda is not None and CUDA_HOME is not None
    kwargs = dict(
        name="ann_kernels._C",
        include_dirs=include_dirs,
        extra_link_args=["-fopenmp"],
    )
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        kwargs["extra_compile_args"] = {
            "cxx": cxx_flags + ["-DANN_KERNELS_WITH_CUDA"],
            "nvcc": opt + ["-DANN_KERNELS_WITH_CUDA", "--use_fast_math"],
        }
        ext = CUDAExtension(sources=sources, **kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        ext = CppExtension(sources=sources, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["ann_kernels", "ann_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
