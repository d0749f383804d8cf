"""Packaging: what a user gets from an sdist, a wheel, `pip install`, and `make`.

* The sdist holds every file of csrc/ that git tracks (headers, csrc/cuda/, its emulation),
  LICENSE and what MANIFEST.in lists, and a wheel built from the unpacked sdist installs into a
  fresh venv where `python -m fbfast --no-bench` passes with the "cpp" backend (one compile of
  the extension, ~60-90 s on 2 cores).
* FBFAST_ALLOW_NO_EXT=1 installs the pure-Python package when the extension does not compile;
  without it the same broken build fails.
* In an environment without torch, which is what pip's build isolation gives setup.py, the
  build stops with a message that says to use `pip install --no-build-isolation`.
* scripts/python_env.py, which picks the interpreter the Makefile installs into.

Fresh venvs are made with `--without-pip`; a `.pth` file holding the outer venv's site-packages
path gives them torch, pip and setuptools. A plain path line adds the directory to sys.path
without processing the `.pth` files in it, so the checkout's editable-install finder stays
inactive and `import fbfast` finds only what was installed into the fresh venv.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
OUTER_SITE = sysconfig.get_paths()["purelib"]  # where torch, pip and setuptools are
TORCH_RELEASE = str(torch.__version__).split("+")[0]
# Generous: CI machines are slow and shared; the compile alone is ~60-90 s on 2 cores.
BUILD_TIMEOUT = 1800
QUICK_TIMEOUT = 300
# What the sdist must hold besides csrc/ (MANIFEST.in's `include` line, and what setuptools adds).
SDIST_TOP_FILES = ["LICENSE", "README.md", "MANIFEST.in", "setup.py", "pyproject.toml"]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX", "PIP_REQUIRE_VIRTUALENV")
           and not k.startswith("FBFAST_")}
    # ninja (torch's BuildExtension finds it on PATH) lives next to this interpreter.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # Everything installed here is a local wheel or directory with --no-deps: never the network.
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.update(extra)
    return env


def _run(cmd, cwd, env=None, timeout=QUICK_TIMEOUT, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=env or _env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({proc.returncode}) in {cwd}:\n"
                    f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def _git_files(*args: str):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        return None
    proc = subprocess.run(["git", "ls-files", "-z", *args], cwd=ROOT, capture_output=True, text=True)
    return sorted(f for f in proc.stdout.split("\0") if f) if proc.returncode == 0 else None


def _copy_tree(dest: Path) -> Path:
    """The checkout as git sees it (tracked and untracked-but-not-ignored files), so no build
    artefact (build/, .venv/, fbfast/_C*.so) comes along and nothing in the checkout changes."""
    files = _git_files("--cached", "--others", "--exclude-standard")
    if files is None:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "_C*.so", "_build_info.py", "out"))
        return dest
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _fresh_venv(path: Path, site_dirs=(OUTER_SITE,)) -> Path:
    """A venv without pip; each of `site_dirs` is appended to its sys.path by a .pth line."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True,
                   capture_output=True, timeout=QUICK_TIMEOUT)
    python = path / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    if site_dirs:
        (site / "outer.pth").write_text("".join(f"{d}\n" for d in site_dirs))
    return python


def _which_fbfast(python: Path, cwd: Path) -> str:
    return _run([python, "-c", "import fbfast; print(fbfast.__file__)"], cwd).stdout.strip()


# --- 1. sdist -> wheel -> fresh venv ------------------------------------------------------------

def _build_sdist(src: Path, out: Path) -> Path:
    if importlib.util.find_spec("build") is not None:
        _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, src], src)
    else:
        _run([sys.executable, "setup.py", "sdist", "--dist-dir", out], src)
    (sdist,) = out.glob("fbfast-*.tar.gz")
    return sdist


def test_sdist_is_complete_and_builds_a_working_wheel(tmp_path):
    src = _copy_tree(tmp_path / "src")
    sdist = _build_sdist(src, tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
        tar.extractall(tmp_path / "unpacked")
    top = members[0].split("/")[0]
    names = {m.split("/", 1)[1] for m in members if "/" in m}

    expected = _git_files("csrc") or sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
                                             if p.is_file())
    expected += SDIST_TOP_FILES + [str(p.relative_to(ROOT)) for p in ROOT.glob("requirements*.txt")]
    expected += [f"fbfast/{p.name}" for p in (ROOT / "fbfast").glob("*.py") if p.name != "_build_info.py"]
    missing = sorted(set(expected) - names)
    assert not missing, f"the sdist lacks {missing}"
    junk = sorted(n for n in names if n.endswith((".so", ".o", ".pyc")) or n.startswith(("build/", ".venv/"))
                  or n == "fbfast/_build_info.py")
    assert not junk, f"the sdist holds build artefacts: {junk}"
    pkg_info = (tmp_path / "unpacked" / top / "PKG-INFO").read_text()
    assert re.search(r"^License(-Expression)?: BSD-3-Clause$", pkg_info, re.M), pkg_info[:2000]

    # The wheel, from the unpacked sdist only: this compiles the extension from what the sdist holds.
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", wheels,
          tmp_path / "unpacked" / top], tmp_path, timeout=BUILD_TIMEOUT)
    (wheel,) = wheels.glob("fbfast-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        wheel_names = zf.namelist()
        metadata = zf.read(next(n for n in wheel_names if n.endswith(".dist-info/METADATA"))).decode()
        build_info = zf.read("fbfast/_build_info.py").decode()
    assert any(re.fullmatch(r"fbfast/_C\..*(so|pyd)", n) for n in wheel_names), wheel_names
    assert any(n.endswith("LICENSE") and ".dist-info/" in n for n in wheel_names), wheel_names
    assert f"Requires-Dist: torch=={TORCH_RELEASE}\n" in metadata, metadata[:2000]
    assert f"TORCH_VERSION = {str(torch.__version__)!r}" in build_info and "EXTENSION_BUILT = True" in build_info

    python = _fresh_venv(tmp_path / "venv")
    _run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", wheel], tmp_path)
    elsewhere = tmp_path / "elsewhere"  # not the source tree, not the unpacked sdist
    elsewhere.mkdir()
    assert _which_fbfast(python, elsewhere).startswith(str(tmp_path / "venv")), "the installed copy must be imported"
    proc = _run([python, "-m", "fbfast", "--no-bench"], elsewhere, timeout=QUICK_TIMEOUT)
    assert re.search(r"^\s*cpp\s+available\b", proc.stdout, re.M), proc.stdout
    assert "PASS: self-check passed" in proc.stdout, proc.stdout


# --- 2. FBFAST_ALLOW_NO_EXT ---------------------------------------------------------------------

# Every compile fails at once, in the compiler itself: distutils adds $CPPFLAGS to each compile
# command that torch's ninja build runs. (CC=/bin/false would fail earlier, in torch's compiler
# check.)
BROKEN_BUILD = {"CPPFLAGS": "-include /nonexistent/fbfast_broken_build.h"}
BROKEN_BUILD_ERROR = "fbfast_broken_build.h: No such file"

CHECK_NO_EXT = r"""
import json, warnings, torch, fbfast, fbfast._build_info as info
status = {k: [v.available, v.reason] for k, v in fbfast.backends().items()}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "auto" warns once that the compiled backend is missing
    y = fbfast.FeedbackMLP(6, 5, 2).rollout(torch.zeros(3, 2), u=torch.randn(4, 3, 4))
print(json.dumps({"file": fbfast.__file__, "status": status, "shape": list(y.shape),
                  "built": info.EXTENSION_BUILT, "torch": info.TORCH_VERSION}))
"""


def test_allow_no_ext_installs_the_python_package_when_the_build_fails(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    install = ["-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--ignore-installed"]

    # Without the flag, the broken build fails the install, and nothing is installed.
    python = _fresh_venv(tmp_path / "venv_strict")
    proc = _run([python, *install, _copy_tree(tmp_path / "strict")], tmp_path,
                env=_env(**BROKEN_BUILD), check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert BROKEN_BUILD_ERROR in log and "FBFAST_ALLOW_NO_EXT=1 is set" not in log, log[-3000:]
    assert _run([python, "-c", "import fbfast"], elsewhere, check=False).returncode != 0

    # With it, the same build installs the pure-Python package, and says why in the build log.
    python = _fresh_venv(tmp_path / "venv_allow")
    proc = _run([python, *install, _copy_tree(tmp_path / "allow")], tmp_path,
                env=_env(FBFAST_ALLOW_NO_EXT="1", **BROKEN_BUILD))
    log = proc.stdout + proc.stderr
    assert BROKEN_BUILD_ERROR in log, log[-3000:]
    assert "building the compiled extension fbfast._C failed" in log and "FBFAST_ALLOW_NO_EXT=1 is set" in log, log[-4000:]
    out = json.loads(_run([python, "-c", CHECK_NO_EXT], elsewhere).stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(tmp_path / "venv_allow")), out["file"]
    assert out["status"]["cpp"][0] is False and "not built" in out["status"]["cpp"][1], out["status"]
    assert out["status"]["eager"][0] is True
    assert out["shape"] == [4, 3, 2]
    assert out["built"] is False and out["torch"] == str(torch.__version__)


# --- 3. build isolation, pyproject.toml, LICENSE ------------------------------------------------

def _link_setuptools(python: Path) -> None:
    """Links the outer venv's setuptools into a venv, as if installed there: what pip's build
    isolation installs (setuptools>=64 from pyproject.toml), without the network. Its
    distutils-precedence.pth must be processed from that site-packages, so that setuptools'
    distutils replaces the standard library's (Python < 3.12 still has one)."""
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    outer = Path(OUTER_SITE)
    if not (outer / "setuptools").is_dir():
        pytest.skip(f"no setuptools in {OUTER_SITE} to build with")
    # The dist-info too: setuptools finds its commands (egg_info, sdist) through its entry points.
    for path in [outer / "setuptools", outer / "_distutils_hack", outer / "pkg_resources",
                 *outer.glob("setuptools-*.dist-info")]:
        if path.is_dir():
            (site / path.name).symlink_to(path, target_is_directory=True)
    if (outer / "distutils-precedence.pth").exists():
        shutil.copy2(outer / "distutils-precedence.pth", site)


def test_isolated_build_says_to_use_no_build_isolation(tmp_path):
    src = _copy_tree(tmp_path / "src")
    python = _fresh_venv(tmp_path / "venv", site_dirs=())
    _link_setuptools(python)
    assert _run([python, "-c", "import torch"], src, check=False).returncode != 0, "torch must be absent here"

    # Exactly what pip's isolated build runs first.
    proc = _run([python, "-c", "from setuptools import build_meta as b; b.get_requires_for_build_wheel()"],
                src, check=False)
    assert proc.returncode != 0
    assert "pip install --no-build-isolation ." in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]

    # An sdist needs no torch: `python -m build` (isolated) makes one before the wheel.
    proc = _run([python, "-c", "import sys; out = sys.argv[1]; from setuptools import build_meta as b; "
                 "assert b.get_requires_for_build_sdist() == [], 'no extra requirements'; "
                 "print(b.build_sdist(out))", tmp_path / "dist"], src)
    with tarfile.open(tmp_path / "dist" / proc.stdout.strip().splitlines()[-1]) as tar:
        names = tar.getnames()
    assert any(n.endswith("csrc/cpu/tile_params.h") for n in names), names


def test_build_requirements_and_license():
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
        requires = tomllib.loads(text)["build-system"]["requires"]
    except ImportError:  # Python < 3.11
        requires = re.findall(r'"([^"]+)"', re.search(r"^requires = \[(.*?)\]", text, re.M | re.S).group(1))
    assert not any(re.match(r"wheel\b", r) for r in requires), requires
    assert any(r.startswith("setuptools") for r in requires), requires
    assert not any(r.startswith("torch") for r in requires), requires
    license_text = (ROOT / "LICENSE").read_text()
    assert "BSD 3-Clause License" in license_text and "the fbfast authors" in license_text


# --- 4. scripts/python_env.py (the Makefile's choice of interpreter) ---------------------------

def _python_env():
    spec = importlib.util.spec_from_file_location("python_env", ROOT / "scripts" / "python_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IN_VENV = sys.prefix != sys.base_prefix


def _base_python():
    """An interpreter that is not in a virtual environment, if one can be found."""
    candidates = [getattr(sys, "_base_executable", None)]
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    if cfg.exists():
        home = re.search(r"^home\s*=\s*(.+)$", cfg.read_text(), re.M)
        if home:
            candidates.append(os.path.join(home.group(1).strip(), f"python{sys.version_info[0]}.{sys.version_info[1]}"))
    for candidate in candidates:
        if not candidate or not os.path.exists(candidate):
            continue
        proc = subprocess.run([candidate, "-c", "import sys; print(sys.prefix == sys.base_prefix)"],
                              capture_output=True, text=True, env=_env())
        if proc.stdout.strip() == "True":
            return candidate
    return None


def test_python_env_in_environment():
    in_env = _python_env().in_environment
    assert in_env("/p/venv", "/usr", {}) is True                      # a venv
    assert in_env("/usr", "/usr", {}, real_prefix="/usr") is True     # an old virtualenv
    assert in_env("/usr", "/usr", {}) is False                        # the system's python3
    assert in_env("/opt/conda", "/opt/conda", {"CONDA_PREFIX": "/opt/conda"}) is True
    # An activated environment does not make another interpreter named by PYTHON= one.
    assert in_env("/usr", "/usr", {"VIRTUAL_ENV": "/p/venv", "CONDA_PREFIX": "/opt/conda"}) is False
    assert in_env("/usr", "/usr", {"VIRTUAL_ENV": "/usr"}) is True


def test_python_env_create_failure_names_python3_venv(tmp_path, monkeypatch):
    env = _python_env()
    monkeypatch.setattr(env, "choose", lambda venv, environ=None: env.venv_python(venv))
    venv = tmp_path / ".venv"

    def debian_venv(cmd, **kwargs):  # what Debian's python3 without python3-venv does
        (venv / "bin").mkdir(parents=True, exist_ok=True)
        (venv / "bin" / "python").write_text("")
        return subprocess.CompletedProcess(cmd, 1)

    with pytest.raises(SystemExit) as excinfo:
        env.create(str(venv), "python3", run=debian_venv, out=io.StringIO())
    assert "apt-get install python3-venv" in str(excinfo.value.code)
    assert not venv.exists(), "a venv without pip must not be left behind"


def test_python_env_query_picks_the_interpreter(tmp_path):
    script = ROOT / "scripts" / "python_env.py"
    venv = tmp_path / ".venv"
    if IN_VENV:  # this interpreter, and the build of the checkout is judged there
        word = _run([sys.executable, script, "--venv", venv], tmp_path).stdout.split()
        assert word[0] == sys.executable and word[1] == sysconfig.get_config_var("EXT_SUFFIX")
        assert word[2] in ("built", "stale")
    base = _base_python()
    if base is None:
        pytest.skip("no interpreter outside a virtual environment found")
    # Outside one: the project's venv, though it does not exist yet; the query creates nothing.
    word = _run([base, script, "--venv", venv], tmp_path).stdout.split()
    assert word == [str(venv / "bin" / "python"), sysconfig.get_config_var("EXT_SUFFIX"), "stale"]
    assert not venv.exists()


def test_make_dry_run_uses_a_venv_outside_one(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make")
    base = _base_python()
    if base is None:
        pytest.skip("no interpreter outside a virtual environment found")
    src = _copy_tree(tmp_path / "src")
    proc = _run(["make", "-n", "build", f"PYTHON={base}"], src)
    assert "scripts/python_env.py --venv .venv" in proc.stdout and "--create" in proc.stdout, proc.stdout
    assert ".venv/bin/python -m pip install -q --no-build-isolation -e ." in proc.stdout, proc.stdout
    assert not (src / ".venv").exists() and not list(src.glob("fbfast/_C*")), "make -n must change nothing"
    if not IN_VENV:
        return
    # Inside a venv, make uses it as it is.
    proc = _run(["make", "-n", "build", f"PYTHON={sys.executable}"], src)
    assert f"{sys.executable} -m pip install -q --no-build-isolation -e ." in proc.stdout, proc.stdout
    assert not re.search(r"^\.venv/bin/python", proc.stdout, re.M), proc.stdout
