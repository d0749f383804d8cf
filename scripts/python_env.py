"""Which Python the Makefile installs into and runs, and whether fbfast's build there is current.

`make` installs torch, the dev tools and fbfast itself, so it must run in an environment of its
own: a stock Debian/Ubuntu python3 refuses `pip install` (PEP 668,
"error: externally-managed-environment"), and installing into any shared interpreter is a side
effect nobody asked for. The rule:

* $(PYTHON) runs in a virtual environment (venv, virtualenv) or an active conda environment:
  use it as it is;
* otherwise: use a venv in the project, `.venv`, made from $(PYTHON) on first use.

    python3 scripts/python_env.py [--venv .venv]           # one line: PY EXT_SUFFIX BUILD_STATE
    python3 scripts/python_env.py [--venv .venv] --create  # make .venv if it is the one to use

The query prints the interpreter to use, its extension suffix (the compiled library is
`fbfast/_C<EXT_SUFFIX>`) and `built` or `stale`: `stale` when that interpreter does not have
fbfast installed in editable mode from this project, or the library here was built against
another torch than the one installed there, or was not built (FBFAST_ALLOW_NO_EXT), so that
`make` rebuilds although no source changed. It never creates anything (`make -n` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Mapping, Optional

PROJECT = Path(__file__).resolve().parent.parent
NO_VENV_MODULE = ("cannot create a virtual environment with {python}: `{python} -m venv` failed "
                  "(on Debian/Ubuntu: sudo apt-get install python3-venv); or activate a virtual "
                  "environment and run make there, or pass PYTHON=/path/to/an/environment's/python")


def in_environment(prefix: str, base_prefix: str, environ: Mapping[str, str],
                   real_prefix: Optional[str] = None) -> bool:
    """Whether an interpreter with these prefixes runs in an environment of its own.

    A venv has sys.prefix != sys.base_prefix, an old-style virtualenv sets sys.real_prefix.
    $VIRTUAL_ENV and $CONDA_PREFIX (set by `activate`) count only when they name this very
    interpreter's prefix: an activated environment says nothing about a PYTHON named elsewhere.
    """
    if real_prefix is not None or os.path.realpath(prefix) != os.path.realpath(base_prefix):
        return True
    for name in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        value = environ.get(name)
        if value and os.path.realpath(value) == os.path.realpath(prefix):
            return True
    return False


def venv_python(venv: str) -> str:
    return os.path.join(venv, "Scripts", "python.exe") if os.name == "nt" else os.path.join(venv, "bin", "python")


def choose(venv: str, environ: Mapping[str, str] = os.environ) -> str:
    """The interpreter `make` uses: this one when it is in an environment, else the venv's."""
    if in_environment(sys.prefix, sys.base_prefix, environ, getattr(sys, "real_prefix", None)):
        return sys.executable
    return venv_python(venv)


def _torch_build_matches(built: str, installed: str) -> bool:
    if built == installed:
        return True
    # Metadata may omit the +local part that torch.__version__ has (or the reverse).
    if "+" not in built or "+" not in installed:
        return built.split("+")[0] == installed.split("+")[0]
    return False


def build_state(project: Path = PROJECT) -> str:
    """`built` when this interpreter has fbfast installed in editable mode from `project` and the
    library there was built against the torch installed here now; else `stale`. Reads package
    metadata and fbfast/_build_info.py (written by setup.py) without importing torch."""
    from importlib import metadata

    try:
        dist = metadata.distribution("fbfast")
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "stale"
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        return "stale"
    if not direct.get("dir_info", {}).get("editable") or direct.get("url") != project.resolve().as_uri():
        return "stale"
    try:
        info = (project / "fbfast" / "_build_info.py").read_text()
    except OSError:
        return "stale"
    version = re.search(r"^TORCH_VERSION = ['\"]([^'\"]+)['\"]", info, re.M)
    if not version or not re.search(r"^EXTENSION_BUILT = True$", info, re.M):
        return "stale"
    return "built" if _torch_build_matches(version.group(1), torch_version) else "stale"


def describe(project: Path = PROJECT) -> str:
    """`EXT_SUFFIX BUILD_STATE` of the running interpreter."""
    return f"{sysconfig.get_config_var('EXT_SUFFIX') or '.so'} {build_state(project)}"


def query(venv: str, project: Path = PROJECT, environ: Mapping[str, str] = os.environ) -> str:
    python = choose(venv, environ)
    if python == sys.executable:
        return f"{python} {describe(project)}"
    if os.path.exists(python):
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--describe", "--project", str(project)],
                              capture_output=True, text=True)
        if proc.returncode == 0 and len(proc.stdout.split()) == 2:
            return f"{python} {proc.stdout.strip()}"
    # No venv yet (it is made from this interpreter, so the suffix is the same), or a broken one.
    return f"{python} {sysconfig.get_config_var('EXT_SUFFIX') or '.so'} stale"


def create(venv: str, python_name: str = "python3", environ: Mapping[str, str] = os.environ,
           run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
           out=sys.stdout) -> None:
    """Make sure the interpreter `make` uses exists; say so in one line when it is the venv.
    Raises SystemExit with a message naming `apt-get install python3-venv` when the venv cannot
    be made (Debian and Ubuntu ship python3 without ensurepip)."""
    python = choose(venv, environ)
    if python == sys.executable:
        return
    why = f"{python_name} ({sys.executable}) is not in a virtual environment"
    if os.path.exists(python):
        if run([python, "-c", "import pip"], capture_output=True).returncode == 0:
            print(f"make: {why}: using {venv} (make distclean removes it)", file=out, flush=True)
            return
        raise SystemExit(f"make: {venv} exists but has no pip (an interrupted or failed `python3 -m venv`?): "
                         f"remove it (make distclean) and retry; " + NO_VENV_MODULE.format(python=python_name))
    print(f"make: {why}: creating {venv} with it and installing there (activate an environment or "
          f"pass PYTHON=... to use another)", file=out, flush=True)
    proc = run([sys.executable, "-m", "venv", venv])
    if proc.returncode != 0 or not os.path.exists(python) or \
            run([python, "-c", "import pip"], capture_output=True).returncode != 0:
        # Debian's python3 without python3-venv leaves a venv without pip behind: remove it so the
        # next run does not take it for a working one.
        shutil.rmtree(venv, ignore_errors=True)
        raise SystemExit("make: " + NO_VENV_MODULE.format(python=python_name))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=".venv", help="the project's venv (default: .venv)")
    parser.add_argument("--python-name", default="python3", help="how the Makefile names this interpreter")
    parser.add_argument("--project", default=str(PROJECT), help=argparse.SUPPRESS)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--create", action="store_true", help="make the venv if it is the one to use")
    mode.add_argument("--describe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    project = Path(args.project)
    if args.describe:
        print(describe(project))
    elif args.create:
        create(args.venv, args.python_name)
    else:
        print(query(args.venv, project))
    return 0


if __name__ == "__main__":
    sys.exit(main())
