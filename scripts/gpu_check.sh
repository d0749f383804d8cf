#!/usr/bin/env bash
# The prepared check of the CUDA backend for a lent GPU machine. Steps, in order:
#
#   step       cap    what
#   machine     ~5 s  nvidia-smi, nvcc, and what $PYTHON's torch sees
#   build      120 s  setup.py build_ext --inplace; nvcc for this GPU's arch only (from
#                     nvidia-smi's compute_cap, else torch), MAX_JOBS=16
#   smoke       30 s  scripts/gpu_smoke.py in its own process under CUDA_LAUNCH_BLOCKING=1: one
#                     case per launch plan (and per depth 1-4, z-keeping activations, bf16 deep,
#                     feedback structures, ensembles with own and shared x0 / u), each named
#                     before it runs, so a device fault names its case instead of cascading
#                     through a pytest run
#   sanitizer   30 s  the smoke's fused cases under compute-sanitizer memcheck (when installed),
#                     only in time that the later steps' full caps do not need
#   tests       90 s  tests/test_cuda.py (FBFAST_CUDA_TESTS=quick; each test at most
#                     FBFAST_CUDA_TEST_TIMEOUT=60 s, see tests/conftest.py)
#   benchmark   40 s  python -m benchmarks.gpu_bench, its --budget 12 s under the step's limit
#   report      ~1 s  $OUT/gpu_report.md and .json
#
# Total at most GPU_CHECK_SECONDS (default 290, so that with the 10 s a stopped step gets to
# exit the run stays under 300 s on an H100 and a second run fits in the same 15 minutes of
# device time). Each step gets its cap (GPU_CHECK_<STEP>_SECONDS overrides it), cut to what is
# left of the total once the later steps' minimum times are set aside; a step with less than
# its own minimum is skipped. Each step runs under `timeout`; its elapsed time is printed and
# reported. GPU_CHECK_BUILD=0 reuses the extension already built in the tree (a second run on
# the same machine).
#
# No failure stops the script: each step's status is recorded, the later steps run when they
# can (a failed build skips the steps that need the extension), and the report is written in
# every case, also when $PYTHON is missing (then by the shell alone). Files under $OUT, six
# (a lent machine sends back at most eight):
#   gpu_report.md, gpu_report.json  steps (status, rc, seconds, limit), smoke cases with their
#                                   errors, test counts and failures, the benchmark's tables
#   gpu_build.log, gpu_smoke.log, gpu_tests.log, gpu_bench.log   each step's whole output
# tests/test_cuda_compile.py is not run here: it needs no GPU and belongs to the CPU runs.
#
# Assumes torch (a CUDA build), nvcc, ninja and pytest are installed, and no internet: nothing
# is downloaded or pip-installed. Exit status 0 when every step passed (the sanitizer may be
# skipped), else 1.
#
#   OUT=out bash scripts/gpu_check.sh
#   OUT=out PYTHON=/opt/venv/bin/python GPU_CHECK_SECONDS=600 bash scripts/gpu_check.sh
set -uo pipefail  # no -e: every failure is recorded and the next step still runs

OUT=${OUT:-out}  # relative to the caller's directory
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
TOTAL=${GPU_CHECK_SECONDS:-290}  # 10 s under 300: a step stopped at its limit gets 10 s to exit
CAP_BUILD=${GPU_CHECK_BUILD_SECONDS:-120}
CAP_SMOKE=${GPU_CHECK_SMOKE_SECONDS:-30}
CAP_SANITIZER=${GPU_CHECK_SANITIZER_SECONDS:-30}
CAP_TESTS=${GPU_CHECK_TESTS_SECONDS:-90}
CAP_BENCH=${GPU_CHECK_BENCH_SECONDS:-40}
RESERVE_REPORT=5
# The least time a step is started with; less than that left, it is skipped.
FLOOR_BUILD=30 FLOOR_SMOKE=10 FLOOR_SANITIZER=15 FLOOR_TESTS=20 FLOOR_BENCH=20
START=$(date +%s)

export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
export FBFAST_FORCE_CUDA=1
# The GPU run trims opcheck to 2 samples and the general path's activation-by-depth cases to one
# depth (tests/test_cuda.py), and stops any test at 60 s.
export FBFAST_CUDA_TESTS=${FBFAST_CUDA_TESTS:-quick}
export FBFAST_CUDA_TEST_TIMEOUT=${FBFAST_CUDA_TEST_TIMEOUT:-60}
# A crashing process must not spend the budget writing a core file of its CUDA context.
ulimit -c 0 2>/dev/null || true

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
STEPS=$WORK/steps.tsv
: > "$STEPS"
rm -f "$OUT/gpu_report.md" "$OUT/gpu_report.json" "$OUT/gpu_build.log" "$OUT/gpu_smoke.log" \
  "$OUT/gpu_tests.log" "$OUT/gpu_bench.log" "$OUT/gpu_check.txt"
REPORTED=0
trap 'finish' EXIT

elapsed() { echo $(( $(date +%s) - START )); }
say() { printf '[gpu_check %4ds] %s\n' "$(elapsed)" "$*"; }

# limit CAP RESERVE: seconds for a step, its cap cut to what is left of TOTAL once RESERVE
# seconds are set aside for the later steps (may be <= 0: no time left).
limit() {
  local rest=$(( TOTAL - $(elapsed) - $2 ))
  if (( rest < $1 )); then echo "$rest"; else echo "$1"; fi
}

# record NAME STATUS RC SECONDS LIMIT NOTE: one line of the steps table (tabs and newlines in
# the note become spaces).
record() {
  local note=${6//$'\t'/ }
  note=${note//$'\n'/ }
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$note" >> "$STEPS"
  say "$1: $2 (rc $3, $4 s of $5 s)${note:+; $note}"
}

# status_of RC: the step status that an exit code means (timeout: 124 after the signal, 137
# after the KILL that follows it).
status_of() {
  case $1 in
    0) echo ok ;;
    124|137) echo timeout ;;
    *) if (( $1 > 128 )); then echo "crashed"; else echo failed; fi ;;
  esac
}

# run LIMIT LOG TEE CMD...: CMD under `timeout` (SIGINT first, so pytest still prints its
# summary; KILL 10 s later), its output appended to LOG and, with TEE=1, shown. Sets RC, SECS.
run() {
  local lim=$1 log=$2 tee=$3 t0
  shift 3
  t0=$(date +%s)
  if (( tee )); then
    timeout --signal=INT --kill-after=10 "$lim" "$@" 2>&1 | tee -a "$log"
    RC=${PIPESTATUS[0]}
  else
    timeout --signal=INT --kill-after=10 "$lim" "$@" >> "$log" 2>&1
    RC=$?
  fi
  SECS=$(( $(date +%s) - t0 ))
}

# ---------------------------------------------------------------------------------------------
# report (defined first: the EXIT trap writes it whenever the script ends)

# write_report_sh: the report from the steps table alone, when no Python can write it.
write_report_sh() {
  local name status rc secs lim note first=1
  {
    echo "# fbfast GPU check"
    echo
    echo "Written by the shell: \`$PYTHON\` could not write the full report."
    echo
    echo "| step | status | rc | seconds | limit | note |"
    echo "|---|---|---:|---:|---:|---|"
    while IFS=$'\t' read -r name status rc secs lim note; do
      echo "| $name | $status | $rc | $secs | $lim | $note |"
    done < "$STEPS"
  } > "$OUT/gpu_report.md"
  {
    printf '{"elapsed_s": %s, "steps": [' "$(elapsed)"
    while IFS=$'\t' read -r name status rc secs lim note; do
      note=${note//\\/\/}
      note=${note//\"/\'}
      (( first )) || printf ','
      first=0
      printf '\n {"name": "%s", "status": "%s", "rc": "%s", "seconds": %s, "limit_s": %s, "note": "%s"}' \
        "$name" "$status" "$rc" "$secs" "${lim:-0}" "$note"
    done < "$STEPS"
    printf '\n]}\n'
  } > "$OUT/gpu_report.json"
}

write_report() {
  local py=$PYTHON
  (( HAVE_PYTHON )) || py=python3
  if command -v "$py" > /dev/null && timeout 60 "$py" - "$OUT" "$WORK" "$(elapsed)" "$TOTAL" <<'EOF'
# The report, from what the steps left: stdlib only, so it runs whatever state torch is in.
import json, os, re, sys
import xml.etree.ElementTree as ET

out, work, elapsed, total = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""

steps = []
for line in text(os.path.join(work, "steps.tsv")).splitlines():
    name, status, rc, secs, lim, note = (line.split("\t") + [""] * 6)[:6]
    steps.append({"name": name, "status": status, "rc": rc, "seconds": int(secs or 0),
                  "limit_s": int(lim) if lim.lstrip("-").isdigit() else None, "note": note})
machine = load(os.path.join(work, "machine.json")) or {}
smoke = load(os.path.join(work, "smoke.json"))
sanitizer = load(os.path.join(work, "sanitizer.json"))
bench = load(os.path.join(work, "bench", "gpu_report.json"))
bench_md = text(os.path.join(work, "bench", "gpu_report.md"))

# Tests: from the JUnit XML when pytest finished; from the -v log when it was cut short.
tests = {"source": None, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
xml_path = os.path.join(work, "tests.xml")
if os.path.exists(xml_path):
    try:
        root = ET.parse(xml_path).getroot()
        tests["source"] = "junit"
        for case in root.iter("testcase"):
            nodeid = f"{case.get('classname', '')}::{case.get('name', '')}"
            kinds = {child.tag for child in case}
            if "failure" in kinds or "error" in kinds:
                tag = "failure" if "failure" in kinds else "error"
                tests["failed" if tag == "failure" else "errors"] += 1
                msg = (case.find(tag).get("message") or "").splitlines()
                tests["failures"].append({"test": nodeid, "message": (msg[0] if msg else "")[:300]})
            elif "skipped" in kinds:
                tests["skipped"] += 1
            else:
                tests["passed"] += 1
    except ET.ParseError:
        pass
log = text(os.path.join(out, "gpu_tests.log"))
if tests["source"] is None and log:
    tests["source"] = "log (pytest did not finish)"
    for m in re.finditer(r"^(tests/test_cuda\.py::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", log, re.M):
        key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors"}.get(m.group(2), "skipped")
        tests[key] += 1
        if key in ("failed", "errors"):
            tests["failures"].append({"test": m.group(1), "message": ""})
    started = re.findall(r"^(tests/test_cuda\.py::\S+)", log, re.M)
    if "Timeout (" in log and started:
        tests["timed_out"] = started[-1]
    elif started:
        tests["last_started"] = started[-1]

# The sanitizer is the one step that may be skipped (not installed, or no time left) in a good run.
ok = all(s["status"] == "ok" or (s["name"], s["status"]) == ("sanitizer", "skipped") for s in steps)
report = {"ok": ok, "elapsed_s": elapsed, "budget_s": total, "machine": machine, "steps": steps,
          "smoke": smoke, "sanitizer": sanitizer, "tests": tests, "benchmark": bench}
with open(os.path.join(out, "gpu_report.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)

md = ["# fbfast GPU check", ""]
gpu = machine.get("gpu") or "no GPU seen by torch"
md.append(f"{gpu} (sm {machine.get('capability', '?')}, {machine.get('sms', '?')} SMs, "
          f"{machine.get('smem_optin', '?')} B opt-in shared memory), torch {machine.get('torch', '?')} "
          f"(CUDA {machine.get('torch_cuda', '?')}), Python {machine.get('python', '?')}; "
          f"{elapsed} s of a {total} s budget. Overall: **{'OK' if ok else 'NOT OK'}**.")
md += ["", "| step | status | rc | seconds | limit | note |", "|---|---|---:|---:|---:|---|"]
for s in steps:
    lim = "" if s["limit_s"] is None else s["limit_s"]
    md.append(f"| {s['name']} | {s['status']} | {s['rc']} | {s['seconds']} | {lim} | {s['note'].replace('|', '/')} |")

def smoke_table(title, res):
    if not res:
        return []
    rows = ["", f"## {title}", "", "| case | status | seconds | max abs error (rel) vs float64 reference |",
            "|---|---|---:|---|"]
    for c in res.get("cases", []):
        errs = ", ".join(f"{n} {e['abs']:.1e} ({e['rel']:.1e}{'' if e.get('ok', True) else ' > bound'})"
                         for n, e in (c.get("errors") or {}).items())
        if c.get("message"):
            errs = (errs + " " if errs else "") + c["message"].splitlines()[0][:200].replace("|", "/")
        status = "died in this case" if c["status"] == "running" else c["status"]
        rows.append(f"| {c['name']} | {status} | {c.get('seconds', '')} | {errs} |")
    if res.get("not_run"):
        rows += ["", "Not run after the CUDA error: " + ", ".join(res["not_run"]) + "."]
    return rows

md += smoke_table("Smoke (CUDA_LAUNCH_BLOCKING=1)", smoke)
md += smoke_table("Smoke under compute-sanitizer memcheck", sanitizer)
if tests["source"]:
    md += ["", "## tests/test_cuda.py", "",
           f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
           f"{tests['skipped']} skipped (from the {tests['source']})."]
    if tests.get("timed_out"):
        md.append(f"Stopped by the per-test time limit in `{tests['timed_out']}`.")
    elif tests.get("last_started"):
        md.append(f"Last test started: `{tests['last_started']}`.")
    for f in tests["failures"][:30]:
        md.append(f"- `{f['test']}`: {f['message'].replace('|', '/')}")
    if len(tests["failures"]) > 30:
        md.append(f"- ... and {len(tests['failures']) - 30} more (gpu_tests.log)")
if bench_md:
    md += ["", "## Benchmark", ""] + ["#" + l if l.startswith("#") else l for l in bench_md.splitlines()]
md.append("")
with open(os.path.join(out, "gpu_report.md"), "w") as f:
    f.write("\n".join(md))
EOF
  then
    return 0
  fi
  write_report_sh
}

finish() {
  local rc=$?
  if (( ! REPORTED )); then
    REPORTED=1
    (( rc == 0 )) || record script failed "$rc" 0 0 "the script itself stopped early"
    write_report
    say "report: $OUT/gpu_report.md, $OUT/gpu_report.json"
    sed -n '/^| step/,/^$/p' "$OUT/gpu_report.md"
  fi
  rm -rf "$WORK"
}

# ---------------------------------------------------------------------------------------------
# machine

t0=$(date +%s)
say "machine"
HAVE_PYTHON=0
if command -v "$PYTHON" > /dev/null; then HAVE_PYTHON=1; fi
NOTES=()
if command -v nvidia-smi > /dev/null; then
  timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv \
    || NOTES+=("nvidia-smi failed")
else
  NOTES+=("no nvidia-smi")
fi
if command -v nvcc > /dev/null; then
  timeout 20 nvcc --version | tail -n 2
else
  NOTES+=("no nvcc on PATH")
fi
SANITIZER=$(command -v compute-sanitizer || true)
for dir in "${CUDA_HOME:-}" /usr/local/cuda; do
  if [[ -z $SANITIZER && -n $dir && -x $dir/bin/compute-sanitizer ]]; then SANITIZER=$dir/bin/compute-sanitizer; fi
done
MACHINE_RC=0
if (( HAVE_PYTHON )); then
  timeout 60 "$PYTHON" - "$WORK/machine.json" "$SANITIZER" <<'EOF'
import json, platform, shutil, sys
info = {"python": platform.python_version(), "executable": sys.executable, "sanitizer": sys.argv[2] or None}
for tool in ("nvcc", "ninja", "nvidia-smi"):
    info[tool] = shutil.which(tool)
try:
    import pytest
    info["pytest"] = pytest.__version__
except ImportError:
    info["pytest"] = None
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    smem_optin=getattr(p, "shared_memory_per_block_optin", None),
                    memory_gib=round(p.total_memory / 2**30, 1))
except Exception as exc:  # a broken torch is reported, not fatal here
    info["torch_error"] = f"{type(exc).__name__}: {exc}"
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=1)
print(", ".join(f"{k} {v}" for k, v in info.items()))
raise SystemExit(0 if info.get("cuda_available") else 3)
EOF
  MACHINE_RC=$?
  if (( MACHINE_RC == 3 )); then NOTES+=("torch sees no GPU"); fi
else
  NOTES+=("no $PYTHON on PATH (set PYTHON)")
  MACHINE_RC=127
fi
# nvcc for this GPU only: one arch is about half the build time of setup.py's default two.
if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
  CAP=$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -n 1 | tr -d ' ')
  if [[ ! $CAP =~ ^[0-9]+\.[0-9]+$ && -s $WORK/machine.json ]]; then
    CAP=$(sed -n 's/.*"capability": "\([0-9.]*\)".*/\1/p' "$WORK/machine.json")
  fi
  if [[ $CAP =~ ^[0-9]+\.[0-9]+$ ]]; then
    export TORCH_CUDA_ARCH_LIST=$CAP
  else
    export TORCH_CUDA_ARCH_LIST="8.0;9.0"
    NOTES+=("GPU arch not found: building for 8.0;9.0")
  fi
fi
NOTES+=("TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" "sanitizer ${SANITIZER:-not found}")
MACHINE_NOTE=$(printf '%s; ' "${NOTES[@]}")
MACHINE_NOTE=${MACHINE_NOTE%; }
record machine "$(status_of "$MACHINE_RC")" "$MACHINE_RC" $(( $(date +%s) - t0 )) 60 "$MACHINE_NOTE"

# ---------------------------------------------------------------------------------------------
# build

# BUILT: the extension loads (the later steps can run; without a GPU they say so themselves).
BUILT=0
LIM=$(limit "$CAP_BUILD" $(( FLOOR_SMOKE + FLOOR_TESTS + FLOOR_BENCH + RESERVE_REPORT )))
if (( ! HAVE_PYTHON )); then
  record build skipped - 0 "$LIM" "no $PYTHON"
elif (( LIM < FLOOR_BUILD )) && [[ ${GPU_CHECK_BUILD:-1} != 0 ]]; then
  record build skipped - 0 "$LIM" "no time left"
else
  BUILD_RC=0
  BUILD_SECS=0
  NOTE=""
  if [[ ${GPU_CHECK_BUILD:-1} == 0 ]]; then
    # A second run on a machine that has built already (the ninja build would be a no-op anyway).
    NOTE="not rebuilt (GPU_CHECK_BUILD=0); "
    echo "GPU_CHECK_BUILD=0: using the extension already in the tree" > "$OUT/gpu_build.log"
  else
    say "build: $PYTHON setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST," \
      "MAX_JOBS=$MAX_JOBS; limit $LIM s)"
    run "$LIM" "$OUT/gpu_build.log" 0 "$PYTHON" setup.py build_ext --inplace
    BUILD_RC=$RC
    BUILD_SECS=$SECS
    grep -E "^\[[0-9]+/[0-9]+\]|error|warning" "$OUT/gpu_build.log" | tail -n 30
  fi
  if (( BUILD_RC == 0 )); then
    # Built is not enough: the extension must load, with its CUDA kernel, and see the GPU.
    timeout 60 "$PYTHON" -c "
import fbfast
from fbfast import ops
s = fbfast.backends()['cuda']
print(('' if s.available else 'cuda backend unavailable: ') + s.reason)
raise SystemExit(0 if s.available else 3 if ops.LOADED else 4)" > "$WORK/backend.txt" 2>&1
    BUILD_RC=$?
    NOTE+=$(tail -n 1 "$WORK/backend.txt")
    if (( BUILD_RC == 0 || BUILD_RC == 3 )); then BUILT=1; fi
  else
    tail -n 40 "$OUT/gpu_build.log"
    NOTE+="see gpu_build.log"
  fi
  record build "$(status_of "$BUILD_RC")" "$BUILD_RC" "$BUILD_SECS" "$LIM" "$NOTE"
fi

# ---------------------------------------------------------------------------------------------
# smoke, then the same cases under compute-sanitizer

LIM=$(limit "$CAP_SMOKE" $(( FLOOR_TESTS + FLOOR_BENCH + RESERVE_REPORT )))
if (( ! BUILT )); then
  record smoke skipped - 0 "$LIM" "no extension"
elif (( LIM < FLOOR_SMOKE )); then
  record smoke skipped - 0 "$LIM" "no time left"
else
  say "smoke: CUDA_LAUNCH_BLOCKING=1 $PYTHON scripts/gpu_smoke.py (limit $LIM s)"
  run "$LIM" "$OUT/gpu_smoke.log" 1 env CUDA_LAUNCH_BLOCKING=1 "$PYTHON" scripts/gpu_smoke.py --json "$WORK/smoke.json"
  case $RC in
    2) NOTE="CUDA error (the case is named in gpu_smoke.log)" ;;
    77) NOTE="no GPU" ;;
    78) NOTE="no fbfast CUDA kernel" ;;
    *) NOTE=$(grep -E "^gpu_smoke: [0-9]+/[0-9]+ ok" "$OUT/gpu_smoke.log" | tail -n 1) ;;
  esac
  if (( RC == 124 || RC == 137 || RC > 128 )); then
    NOTE="last case started: $(grep -E '^== ' "$OUT/gpu_smoke.log" | tail -n 1 | cut -c4- | cut -d: -f1)"
  fi
  record smoke "$(status_of "$RC")" "$RC" "$SECS" "$LIM" "$NOTE"
fi

# The one step that gives way: it gets only what the full caps of the tests and benchmark leave.
LIM=$(limit "$CAP_SANITIZER" $(( CAP_TESTS + CAP_BENCH + RESERVE_REPORT )))
if [[ -z $SANITIZER ]]; then
  record sanitizer skipped - 0 0 "compute-sanitizer not found"
elif (( ! BUILT )); then
  record sanitizer skipped - 0 "$LIM" "no extension"
elif (( LIM < FLOOR_SANITIZER )); then
  record sanitizer skipped - 0 "$LIM" "no time left"
else
  # No caching allocator: each tensor is its own cudaMalloc, so memcheck sees an out-of-bounds
  # global access past a tensor's end instead of inside a larger cached block.
  say "sanitizer: compute-sanitizer --tool memcheck $PYTHON scripts/gpu_smoke.py --only fused (limit $LIM s)"
  echo "==== compute-sanitizer --tool memcheck, fused cases ====" >> "$OUT/gpu_smoke.log"
  run "$LIM" "$OUT/gpu_smoke.log" 1 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 CUDA_LAUNCH_BLOCKING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 86 --print-limit 20 --report-api-errors no \
    "$PYTHON" scripts/gpu_smoke.py --only fused --json "$WORK/sanitizer.json"
  NOTE=$(grep -E "ERROR SUMMARY" "$OUT/gpu_smoke.log" | tail -n 1 | sed 's/^=* *//')
  if (( RC == 86 )); then
    NOTE="memcheck errors: ${NOTE:-see gpu_smoke.log}"
  elif (( RC == 124 || RC == 137 )); then
    NOTE="cut at the limit in case: $(grep -E '^== ' "$OUT/gpu_smoke.log" | tail -n 1 | cut -c4- | cut -d: -f1)"
  fi
  record sanitizer "$(status_of "$RC")" "$RC" "$SECS" "$LIM" "$NOTE"
fi

# ---------------------------------------------------------------------------------------------
# tests

LIM=$(limit "$CAP_TESTS" $(( FLOOR_BENCH + RESERVE_REPORT )))
if (( ! BUILT )); then
  record tests skipped - 0 "$LIM" "no extension"
elif (( LIM < FLOOR_TESTS )); then
  record tests skipped - 0 "$LIM" "no time left"
else
  # -v: the log names each test as it starts, so a test stopped by its time limit (which ends
  # the process, see tests/conftest.py) is named; --tb=short keeps hundreds of failures readable.
  say "tests: $PYTHON -m pytest tests/test_cuda.py (FBFAST_CUDA_TESTS=$FBFAST_CUDA_TESTS," \
    "FBFAST_CUDA_TEST_TIMEOUT=$FBFAST_CUDA_TEST_TIMEOUT; limit $LIM s)"
  # The log gets every line; the terminal (whose tail is what a lent machine's caller sees)
  # gets failures, the slowest tests and the summary.
  run "$LIM" "$OUT/gpu_tests.log" 0 "$PYTHON" -m pytest tests/test_cuda.py -v --tb=short --maxfail=100 \
    -p no:cacheprovider --durations=15 --junitxml="$WORK/tests.xml"
  grep -E "^(FAILED|ERROR) |Timeout \(|Fatal Python error" "$OUT/gpu_tests.log" | head -n 40
  sed -n '/slowest [0-9]* durations/,/^(/p' "$OUT/gpu_tests.log" | head -n 20
  tail -n 3 "$OUT/gpu_tests.log"
  NOTE=$(grep -E "^=+ .*(passed|failed|error|skipped|no tests ran).* =+$" "$OUT/gpu_tests.log" | tail -n 1 | tr -d '=')
  NOTE=${NOTE# }
  NOTE=${NOTE% }
  LAST=$(grep -oE '^tests/test_cuda\.py::[^ ]+' "$OUT/gpu_tests.log" | tail -n 1)
  if grep -q "Timeout (" "$OUT/gpu_tests.log"; then
    NOTE="stopped by FBFAST_CUDA_TEST_TIMEOUT=${FBFAST_CUDA_TEST_TIMEOUT} s in $LAST"
  elif [[ -z $NOTE ]]; then
    NOTE="pytest died; last test started: ${LAST:-none}"
  fi
  STATUS=$(status_of "$RC")
  if [[ $STATUS == ok ]] && ! grep -qE "^=+ .*[0-9]+ passed" "$OUT/gpu_tests.log"; then
    STATUS=failed  # all skipped: no GPU, or no CUDA kernel
  fi
  record tests "$STATUS" "$RC" "$SECS" "$LIM" "$NOTE"
fi

# ---------------------------------------------------------------------------------------------
# benchmark

LIM=$(limit "$CAP_BENCH" "$RESERVE_REPORT")
if (( ! BUILT )); then
  record benchmark skipped - 0 "$LIM" "no extension"
elif (( LIM < FLOOR_BENCH )); then
  record benchmark skipped - 0 "$LIM" "no time left"
else
  # The benchmark stops starting entries at --budget; 12 s are left for its imports and the
  # entry in flight. Within the default 40 s, less than gpu_bench's --compile-reserve (30 s) is
  # ever left, so the torch.compile baselines are reported as skipped rather than started.
  BUDGET=$(( LIM - 12 ))
  mkdir -p "$WORK/bench"
  say "benchmark: $PYTHON -m benchmarks.gpu_bench --budget $BUDGET (limit $LIM s)"
  run "$LIM" "$OUT/gpu_bench.log" 1 "$PYTHON" -m benchmarks.gpu_bench --out "$WORK/bench" --budget "$BUDGET" \
    --entry-budget 8 --runs 5 --target 0.05
  record benchmark "$(status_of "$RC")" "$RC" "$SECS" "$LIM" ""
fi

# As in the report: every step ok, the sanitizer aside, which may be skipped.
FAILED=$(awk -F'\t' '$2 != "ok" && !($1 == "sanitizer" && $2 == "skipped")' "$STEPS" | wc -l)
say "done in $(elapsed) s of $TOTAL s; steps not ok: $FAILED"
finish
exit $(( FAILED > 0 ))
