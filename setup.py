"""Build fbfast's compiled kernels as one extension module, `fbfast._C`.

Sources are found by the folder convention: `csrc/*.cpp` (schemas) and `csrc/cpu/*.cpp`
always; `csrc/cuda/*.cu` when CUDA is found or FBFAST_FORCE_CUDA=1 (never with
FBFAST_SKIP_CUDA=1). The CPU kernels are compiled without -march=native: the AVX2 variant is
selected per file by `#pragma GCC target` and at run time by CPUID, so one wheel runs on any
x86-64 (and on aarch64 through the portable path).

Install with `pip install --no-build-isolation .` (or `-e .`): the extension must link against
the torch that is already installed, so this file imports it. Plain `pip install .` builds in an
isolated environment without torch and stops with a message saying so (not a bare
ModuleNotFoundError). Making an sdist needs no torch: MANIFEST.in lists its files.

A failed build of the extension does not fail the install of the Python package when
FBFAST_ALLOW_NO_EXT=1: setup.py prints a warning (shown by `pip install -v`) and `import fbfast`
then runs on the pure-PyTorch backends (fbfast/ops.py handles the missing `_C`).

Every build writes fbfast/_build_info.py (generated, git-ignored): the torch it was built
against, whether CUDA kernels were compiled, and whether the extension was built at all.
"""

import glob
import os
import sys

import setuptools
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
TESTED = "torch 2.13.0 (CPU) on Python 3.11, Linux x86-64"
BUILD_INFO = os.path.join("fbfast", "_build_info.py")

NO_TORCH = """
error: fbfast's setup.py cannot import torch ({exc}).

fbfast compiles a C++/CUDA extension that must link against the torch already installed in the
environment you install it into, so it is built without pip's build isolation:

    pip install --no-build-isolation .        (or: pip install --no-build-isolation -e .)

Plain `pip install .` builds in a fresh, isolated environment that has no torch. torch is not a
build requirement on purpose: an isolated build would download another, multi-GB torch, compile
against it, and the extension would then not load with your torch.
If torch is not installed at all, install it first, e.g. `pip install torch==2.13.0`
(fbfast is tested with {tested}).
"""

ALLOW_NO_EXT_WARNING = """
========================================================================================
fbfast: WARNING: building the compiled extension fbfast._C failed:
    {error}
FBFAST_ALLOW_NO_EXT=1 is set, so the pure-Python package is installed without it:
`import fbfast` works on the pure-PyTorch backends ("eager", "compile") and
fbfast.backends() reports "cpp" as missing. For the fused kernels, fix the build (see the
compiler output above) and reinstall with `pip install --no-build-isolation -v .`.
========================================================================================
"""


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _sdist_only() -> bool:
    """Whether this run only makes a source distribution, which needs neither torch nor a
    compiler: `setup.py sdist`, or setuptools' PEP 517 hooks `build_sdist` and
    `get_requires_for_build_sdist` (setuptools.build_meta executes this file from inside them,
    and the latter runs it as `egg_info`, exactly as the wheel hooks do: only the caller differs)."""
    if "sdist" in sys.argv[1:]:
        return True
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name in ("build_sdist", "get_requires_for_build_sdist"):
            return True
        frame = frame.f_back
    return False


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        # SystemExit with a message: pip prints it as the build's output (setuptools.build_meta
        # re-raises a failing SystemExit), where a traceback would end in ModuleNotFoundError.
        raise SystemExit(NO_TORCH.format(exc=exc, tested=TESTED)) from None
    return torch


def _extensions(torch):
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    if sys.platform == "darwin":
        cxx_flags.remove("-fopenmp")
    link_flags = [] if sys.platform == "darwin" else ["-fopenmp"]

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


def _write_if_changed(path: str, text: str) -> None:
    try:
        with open(path) as f:
            if f.read() == text:
                return  # an unchanged mtime keeps `make` from seeing a change
    except OSError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _build_ext_class(torch):
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        """torch's BuildExtension (ninja), plus FBFAST_ALLOW_NO_EXT and fbfast/_build_info.py."""

        def run(self):
            inplace = self.inplace
            try:
                super().run()
                built = True
            except Exception as exc:  # CompileError, ninja's RuntimeError, a CUDA version check...
                if not _flag("FBFAST_ALLOW_NO_EXT"):
                    raise
                built = False
                # setuptools' build_ext.run clears `inplace` while it builds and restores it only
                # when the build succeeds.
                self.inplace = inplace
                self._remove_outputs()
                sys.stderr.write(ALLOW_NO_EXT_WARNING.format(
                    error=f"{type(exc).__name__}: {str(exc).strip() or '(no message)'}"))
                sys.stderr.flush()
            self._write_build_info(built)

        def _remove_outputs(self):
            # A library left by an earlier build would not match these sources: the package is
            # installed without one rather than with a stale one. The in-tree copy is this
            # build's output only for editable installs and `build_ext --inplace`.
            for ext in self.extensions:
                name = self.get_ext_filename(ext.name)  # fbfast/_C.cpython-311-x86_64-linux-gnu.so
                paths = [os.path.join(self.build_lib, name)] + ([os.path.join(ROOT, name)] if self.inplace else [])
                for path in paths:
                    if os.path.exists(path):
                        os.remove(path)

        def _write_build_info(self, built: bool) -> None:
            with_cuda = built and any(src.endswith(".cu") for ext in self.extensions for src in ext.sources)
            text = ("# Generated by setup.py when fbfast was built (git-ignored): what fbfast._C was\n"
                    "# built against. A compiled extension loads only with the torch it was built for.\n"
                    f"TORCH_VERSION = {str(torch.__version__)!r}\n"
                    f"WITH_CUDA = {with_cuda}\n"
                    f"EXTENSION_BUILT = {built}\n")
            # In place (editable installs, `build_ext --inplace`) the source tree is the package;
            # otherwise build_lib is what the wheel packs (build_py has already copied the package
            # there, with any in-tree _build_info.py of an editable build, which this replaces).
            package = ROOT if self.inplace else os.path.abspath(self.build_lib)
            _write_if_changed(os.path.join(package, BUILD_INFO), text)

    return BuildExt


def _readme() -> str:
    try:
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def _requirements(name: str) -> list:
    """The requirement lines of a requirements file beside setup.py (comments and blanks left out)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def main():
    metadata = dict(
        name="fbfast",
        version="0.1.0",
        description="Fused feedback-MLP rollouts (forward and BPTT) for PyTorch, on CPU and CUDA",
        long_description=f"Tested with {TESTED}.\n\n" + _readme(),
        long_description_content_type="text/markdown",
        packages=find_packages(include=["fbfast", "fbfast.*"]),
        python_requires=">=3.9",
        # `pip install .[examples]`: what the real-workload examples need (requirements-examples.txt).
        extras_require={"examples": _requirements("requirements-examples.txt")},
        classifiers=[
            "Programming Language :: Python :: 3",
            "Programming Language :: C++",
            "Operating System :: POSIX :: Linux",
            "Topic :: Scientific/Engineering :: Artificial Intelligence",
        ],
    )
    # PEP 639's License-Expression where setuptools knows it (>= 77); the older License field,
    # with the same SPDX identifier, otherwise.
    if int(setuptools.__version__.split(".")[0]) >= 77:
        metadata["license_expression"] = "BSD-3-Clause"
    else:
        metadata["license"] = "BSD-3-Clause"
    metadata["license_files"] = ["LICENSE"]

    if _sdist_only():
        # Sources only: the wheel built from this sdist pins the torch it is built against.
        setup(**metadata, install_requires=["torch>=2.4"])
        return

    torch = _import_torch()
    # A compiled extension only loads with the torch it was built against (C++ ABI, symbols
    # from libtorch): pin exactly that release. The +local part (+cpu, +cu126) is dropped so
    # that the pin names a release; `==2.13.0` still matches an installed 2.13.0+cpu.
    torch_release = str(torch.__version__).split("+")[0]
    setup(
        **metadata,
        ext_modules=_extensions(torch),
        cmdclass={"build_ext": _build_ext_class(torch)},
        install_requires=[f"torch=={torch_release}"],
    )


if __name__ == "__main__":
    main()
