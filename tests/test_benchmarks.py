"""Smoke tests of the benchmark scripts in benchmarks/: they run and print their tables.

Only that they run: timing never appears in an assertion (tests/README.md); the numbers are
produced and read by the full runs that benchmarks/README.md lists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mbrl_quick_runs_and_prints_its_tables(tmp_path):
    out = tmp_path / "mbrl.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.mbrl", "--quick", "--repeats", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "## Model-based-RL ensemble rollout (--quick)" in text
    assert "| mode | method | time | vs loop | GFLOP/s |" in text
    for row in ("| fwd | loop |", "| fwd | fbfast |", "| train | loop |", "| train | fbfast |"):
        assert row in text
    assert "| method | peak RSS delta (MiB) | allocator peak (MiB) |" in text
    assert "failed:" not in text  # both memory children ran
    assert "| target | goal | measured | met |" in text
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"fwd", "train"}
    assert set(data["results"]["train"]) == {"loop", "fbfast"}
    assert (tmp_path / "mbrl.md").read_text().startswith("## Model-based-RL ensemble rollout")
