"""Build fbfast's compiled kernels as one extension module, `fbfast._C`.

Sources are found by the folder convention: `csrc/*.cpp` (schemas) and `csrc/cpu/*.cpp`
always; `csrc/cuda/*.cu` when CUDA is found or FBFAST_FORCE_CUDA=1 (never with
FBFAST_SKIP_CUDA=1). The CPU kernels are compiled without -march=native: the AVX2 variant is
selected per file by `#pragma GCC target` and at run time by CPUID, so one wheel runs on any
x86-64 (and on aarch64 through the portable path).

A failed build of the extension does not fail the install of the Python package when
FBFAST_ALLOW_NO_EXT=1: `import fbfast` then runs on the pure-PyTorch backends.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _extensions():
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    if sys.platform == "darwin":
        cxx_flags.remove("-fopenmp")
    link_flags = [] if sys.platform == "darwin" else ["-fopenmp"]

    import torch

    want_cuda = not _flag("FBFAST_SKIP_CUDA") and (
        _flag("FBFAST_FORCE_CUDA") or (torch.cuda.is_available() and CUDA_HOME is not None)
        or (CUDA_HOME is not None and torch.version.cuda is not None)
    )
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    if want_cuda and cuda_sources:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        nvcc_flags = ["-O3", "-lineinfo"]
        return [CUDAExtension(
            "fbfast._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DFBFAST_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )]
    return [CppExtension("fbfast._C", sources,
                         extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="fbfast",
        version="0.1.0",
        description="Fused feedback-MLP rollouts (forward and BPTT) for PyTorch, on CPU and CUDA",
        packages=find_packages(include=["fbfast", "fbfast.*"]),
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        python_requires=">=3.9",
        install_requires=["torch>=2.4"],
    )


if __name__ == "__main__":
    main()
