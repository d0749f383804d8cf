"""Degraded installs: without a working compiled extension, fbfast still works.

Each scenario copies the Python package (never the built library) into a temporary directory,
adds what the scenario needs, and imports that copy in a fresh interpreter:

* ``absent``: no ``_C*.so`` at all (a source checkout that was never built);
* ``garbage``: a ``_C*.so`` that is not a shared library (a truncated or corrupt file);
* ``undefined_symbol``: a real shared library that fails to load with "undefined symbol", the
  way a build against another torch fails (compiled here with the system C compiler).

In each: ``import fbfast`` works and warns nothing, ``backends()`` says why "cpp" is missing,
"auto" runs "eager" (the reference's results and gradients) with exactly one RuntimeWarning over
several calls, and ``backend="cpp"`` raises a RuntimeError that gives the build command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

import fbfast

PACKAGE = os.path.dirname(os.path.abspath(fbfast.__file__))
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"  # e.g. .cpython-311-x86_64-linux-gnu.so

CHILD = textwrap.dedent(r'''
    import json, os, sys, warnings
    # An editable install's finder (last on sys.meta_path) would resolve fbfast._C, missing
    # from the copy, to the checkout's build: drop it so that the copy is all there is.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
    warnings.simplefilter("always")  # Python's once-per-location filter must not hide repeats
    with warnings.catch_warnings(record=True) as at_import:
        import fbfast
        from fbfast import ops
    import torch
    out = {"file": fbfast.__file__, "import_warnings": [str(w.message) for w in at_import],
           "loaded": ops.LOADED, "built": ops.BUILT, "load_error": ops.LOAD_ERROR,
           "status": {k: [s.available, s.reason] for k, s in fbfast.backends().items()},
           "has_ops": hasattr(torch.ops.fbfast, "rollout_forward")}
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 2, generator=g).requires_grad_()
    u = torch.randn(5, 3, 4, generator=g)
    w1 = torch.randn(6, 6, generator=g).requires_grad_()
    b1 = torch.randn(6, generator=g)
    w2 = torch.randn(2, 6, generator=g).requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        ys = [fbfast.rollout(x0, w1, b1, w2, None, u=u, delay=2, truncate=2) for _ in range(3)]
        model = fbfast.FeedbackMLP(6, 5, 2)
        model.rollout(x0.detach(), u=u, delay=2)
        fbfast.rollout(x0.double(), w1.double(), None, w2.double(), None, u=u.double(), delay=2)
    out["warnings"] = [[w.category.__name__, str(w.message), os.path.basename(w.filename)] for w in caught]
    ref = fbfast.rollout_reference(x0, w1, b1, w2, None, 5, u, 2, 2)
    out["auto_equals_reference"] = all(torch.equal(y, ref) for y in ys)
    out["auto_grad_fn"] = ys[0].grad_fn.name()
    g_auto = torch.autograd.grad(ys[0].square().sum(), [x0, w1, w2])
    g_ref = torch.autograd.grad(ref.square().sum(), [x0, w1, w2])
    out["grads_equal"] = all(torch.equal(a, b) for a, b in zip(g_auto, g_ref))
    try:
        fbfast.rollout(x0, w1, b1, w2, None, u=u, delay=2, backend="cpp")
        out["explicit_cpp"] = None
    except Exception as exc:
        out["explicit_cpp"] = [type(exc).__name__, str(exc)]
    print(json.dumps(out))
''')


def _copy_package(root) -> str:
    dest = os.path.join(str(root), "fbfast")
    shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    return dest


def _run_child(root) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FBFAST_BACKEND", "PYTHONPATH")}
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=str(root), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # The copy was imported, not the package of the checkout.
    assert os.path.dirname(out["file"]) == os.path.join(str(root), "fbfast"), out["file"]
    return out


def _undefined_symbol_library(path: str) -> None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler to build a library with an undefined symbol")
    src = path + ".c"
    with open(src, "w") as f:
        # What a build against another torch looks like at load time: the module links a
        # symbol that the loaded libtorch does not export.
        f.write("extern void *_ZN3c1023fbfast_test_missing_symbolEv(void);\n"
                "void *PyInit__C(void) { return _ZN3c1023fbfast_test_missing_symbolEv(); }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", path, src], check=True, capture_output=True)
    os.remove(src)


def _scenario(name: str, root) -> dict:
    dest = _copy_package(root)
    library = os.path.join(dest, "_C" + SUFFIX)
    if name == "garbage":
        with open(library, "wb") as f:
            f.write(b"this is not an ELF file\x00" * 40)
    elif name == "undefined_symbol":
        _undefined_symbol_library(library)
    return _run_child(root)


@pytest.mark.parametrize("scenario", ["absent", "garbage", "undefined_symbol"])
def test_degraded_install(scenario, tmp_path):
    out = _scenario(scenario, tmp_path)
    # import works, silently, and no operator was registered
    assert out["import_warnings"] == []
    assert out["loaded"] is False and out["has_ops"] is False
    assert out["built"] is (scenario != "absent")
    # backends() says why
    cpp_ok, cpp_reason = out["status"]["cpp"]
    assert cpp_ok is False
    assert out["status"]["eager"][0] and out["status"]["compile"][0]
    assert out["status"]["cuda"][0] is False
    assert "pip install --no-build-isolation" in cpp_reason
    if scenario == "absent":
        assert "not built" in cpp_reason, cpp_reason
    else:
        assert "did not load" in cpp_reason and "ImportError" in cpp_reason, cpp_reason
        assert "fbfast source tree" in cpp_reason, cpp_reason
        if scenario == "undefined_symbol":
            assert "undefined symbol" in cpp_reason and "fbfast_test_missing_symbol" in cpp_reason, cpp_reason
    # "auto" runs the reference, with one warning over 3 functional calls, a module rollout and
    # a float64 call
    assert out["auto_grad_fn"] == "StackBackward0"
    assert out["auto_equals_reference"] and out["grads_equal"]
    assert len(out["warnings"]) == 1, out["warnings"]
    category, message, filename = out["warnings"][0]
    assert category == "RuntimeWarning"
    assert "'cpp'" in message and "'eager'" in message and cpp_reason in message, message
    assert filename == "<string>", "the warning should point at the caller's line"
    # asking for "cpp" is a clear error with the build command
    kind, message = out["explicit_cpp"]
    assert kind == "RuntimeError"
    assert "'cpp' is not available" in message and "pip install --no-build-isolation" in message, message


def test_the_built_package_is_not_degraded():
    # The same checks would fail on the real build: the scenarios above test something.
    status = fbfast.backends()["cpp"]
    if not status.available:
        pytest.skip(status.reason)
    assert fbfast.ops.LOADED and fbfast.ops.BUILT and fbfast.ops.LOAD_ERROR is None
