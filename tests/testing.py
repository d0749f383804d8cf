"""The test-suite's shared helpers: fbfast.testing (tolerances, random problems, the mode
grid; see its docstring for the tolerance table), re-exported, plus what only the tests need
(devices, whether the C++ kernel is here, kernel variants, the examples)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import sys

import torch

import fbfast
from fbfast.testing import MODE_GRID, TOLERANCES, Problem, assert_close, grads, make_problem  # noqa: F401

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CPP = fbfast.backends()["cpp"].available
# Why "cpp" is missing, for skip reasons: a build from older sources says so (fbfast/ops.py).
CPP_REASON = fbfast.backends()["cpp"].reason


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
# Subprocesses of the example tests get one OpenMP thread too (see the one_thread fixture).
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1")


@contextlib.contextmanager
def cpu_variant(path: str = "auto", isa: str = "auto"):
    """Pin the CPU kernel's path and instruction set for a block (fbfast.kernel_options); a
    variant this CPU cannot run skips the test."""
    import pytest
    try:
        previous = fbfast.set_kernel_options(cpu_path=path, cpu_isa=isa)
    except RuntimeError as exc:
        if "not supported by this CPU" in str(exc):
            pytest.skip(str(exc))
        raise
    try:
        yield
    finally:
        fbfast.set_kernel_options(**previous)


def load_script(path: pathlib.Path, module_name: str):
    """Import the script at ``path`` by path (examples/ and scripts/ are folders of scripts, not
    packages), as ``module_name``."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_example(name: str):
    """Import examples/<name>.py."""
    return load_script(EXAMPLES / f"{name}.py", f"examples_{name}")
