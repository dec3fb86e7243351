#!/usr/bin/env bash
# One short, prepared GPU check of the Triton backend (issue 13): run it from the repository root on a machine
# with a CUDA GPU. It
#   1. records the machine (nvidia-smi, torch, CUDA, triton, the commit),
#   2. makes the project importable (pip install -e . without touching the machine's CUDA torch, else
#      PYTHONPATH=src) and checks the packages the checks need,
#   3. runs the CUDA tests (pytest -m cuda, TRITON_INTERPRET unset: the kernel is compiled, not interpreted),
#   4. runs `emdloss bench --device cuda`: batch 256, the ImageNet-1k WordNet tree (when the shared data is
#      found; else a random 1,000-class tree stands in) and a 1,000-class chain, hard and soft targets,
#      rho 1 and 2: triton, the torch reference eager and under torch.compile, against F.cross_entropy,
#   5. runs a second bench over growing class counts (random trees 10^3..10^5 classes, chains 10^3..10^6) at
#      batch 256, to show that the kernel's time grows linearly with the classes,
# and writes everything under $OUT (default ./out/gpu_check): machine.txt, pytest_cuda.txt, bench_ratios/,
# bench_scaling/ (bench.md, bench.json each) and summary.md. Budget: about 8 minutes on an H200; every step has
# its own timeout, so a hung step cannot eat the rest.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh
#   EMDLOSS_DATA=/path/to/shared/data OUT=... bash benchmarks/gpu_check.sh     # with the ImageNet tree
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_check}"  # out/ is git-ignored
mkdir -p "$OUT"
unset TRITON_INTERPRET  # the interpreter is for CPU-only test runs; here the kernel must be compiled
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
started=$(date +%s)
log() { echo "[gpu_check $(($(date +%s) - started)) s] $*" | tee -a "$OUT/summary.md"; }

echo "# GPU check of the Triton backend" > "$OUT/summary.md"
log "date $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"

# ---------------------------------------------------------------- 1. the machine
{
  echo "## nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi not found"
  echo "## python"; "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton missing:", exc)
EOF
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "FAIL: torch sees no CUDA device; nothing to measure"; exit 1
fi

# ---------------------------------------------------------------- 2. the project and what the checks need
# --no-deps: never let pip replace the machine's CUDA build of torch (or pull one)
if timeout 60 "$PY" -m pip install --retries 0 --timeout 5 --no-deps --no-build-isolation -q -e . > "$OUT/pip.txt" 2>&1; then
  log "installed the project (pip install --no-deps -e .)"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  log "pip install -e . failed (see pip.txt): using PYTHONPATH=src"
fi
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["numpy", "numba", "triton", "pytest", "tqdm", "matplotlib"]  # bench: numba (threads), tqdm, matplotlib
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  log "missing: $missing; trying pip (works only if this machine reaches a package index)"
  timeout 60 "$PY" -m pip install --retries 0 --timeout 5 -q $missing "triton>=3" >> "$OUT/pip.txt" 2>&1 || true
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'pip replaced the CUDA torch'" || {
    log "FAIL: torch lost CUDA after pip"; exit 1; }
fi
"$PY" -c "import emdloss, triton; print('emdloss', emdloss.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/summary.md"

# ---------------------------------------------------------------- 3. CUDA tests
log "pytest -m cuda"
timeout 150 "$PY" -m pytest -m cuda -q -p no:randomly -p no:cacheprovider -rs tests/ > "$OUT/pytest_cuda.txt" 2>&1
rc=$?
tail -n 15 "$OUT/pytest_cuda.txt"
log "pytest -m cuda: exit $rc ($(tail -n 1 "$OUT/pytest_cuda.txt"))"

# ---------------------------------------------------------------- 4. the ratio workloads
trees="imagenet,chain1000"
if ! "$PY" -c "from emdloss_lab.data import imagenet_tree; imagenet_tree()" > /dev/null 2>&1; then
  trees="random1000,chain1000"
  log "the ImageNet tree is not here (set EMDLOSS_DATA to the shared data folder): random1000 stands in"
fi
log "bench --device cuda --trees $trees"
timeout 240 "$PY" -m emdloss bench --device cuda --out "$OUT/bench_ratios" --batch 256 --trees "$trees" \
  --no-progress > "$OUT/bench_ratios.txt" 2>&1
log "bench ratios: exit $?"
tail -n 40 "$OUT/bench_ratios.txt"

# ---------------------------------------------------------------- 5. growth with the number of classes
log "bench --device cuda, growing class counts (no torch.compile)"
timeout 120 "$PY" -m emdloss bench --device cuda --out "$OUT/bench_scaling" --batch 256 --no-compile \
  --trees random1000,random10000,random100000,chain1000,chain10000,chain100000,chain1000000 \
  --rounds 5 --no-progress > "$OUT/bench_scaling.txt" 2>&1
log "bench scaling: exit $?"
tail -n 40 "$OUT/bench_scaling.txt"
"$PY" - "$OUT/bench_scaling/bench.json" <<'EOF' 2>&1 | tee -a "$OUT/summary.md"
import json, sys
import numpy as np
rows = json.load(open(sys.argv[1]))["ratios"]
print("\n## Time against classes (batch 256, hard targets, forward+backward, ms)\n")
print("| method | tree family | classes: ms | log-log slope |")
print("|---|---|---|---|")
for family in ("triton", "torch", "ce"):
    for kind in ("random", "chain"):
        pts = sorted((r["classes"], r["seconds"] * 1e3) for r in rows
                     if r["family"] == family and r["target"] == "hard" and r["tree"].startswith(kind)
                     and r.get("seconds") and (r["rho"] in (None, 2.0)))
        if len(pts) >= 2:
            c, t = np.array(pts).T
            slope = np.polyfit(np.log(c), np.log(t), 1)[0]
            print(f"| {family} | {kind} | {', '.join(f'{int(a)}: {b:.3f}' for a, b in pts)} | {slope:.2f} |")
EOF
log "done in $(($(date +%s) - started)) s; outputs in $OUT"
