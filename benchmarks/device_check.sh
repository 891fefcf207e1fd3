#!/usr/bin/env bash
# The GPU check, one script for a lent GPU machine (about 6 minutes on one modern GPU; every
# step has its own time limit so the whole stays under 8). It installs nothing: it needs the
# project's own environment (torch with CUDA, ray, optuna, mlflow) and the shared CIFAR-10 copy
# at ../shared/data/cifar10-jpeg.tar.gz beside the repository.
#
#   1. a 1-epoch CUDA trial of `python -m trainables.train` on CIFAR-10 (ResNet20 width 16,
#      4-bit BR, PGD-10 training, bf16, 2,000 test images), then its checkpoint loaded by a
#      CPU-only process (CUDA_VISIBLE_DEVICES="");
#   2. the exact-resume and device tests of the suite on CUDA (tests/test_train_cli.py resume,
#      tests/test_device.py);
#   3. a 2-trial packed sweep on the one GPU (--gpus-per-trial 0.5, device=cuda pinned);
#   4. benchmarks/gpu_throughput.py (plain vs PGD-10 epochs, each option, 1/2/4/8 packed trials).
#
# Logs and JSON go to $OUT when it is set (else ./device_check_out); the last stdout line is a
# JSON summary: each step's exit code and seconds, the trial's metrics and the throughput figures.
#
#   bash benchmarks/device_check.sh
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$PWD/device_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
unset RAY_ADDRESS MLFLOW_TRACKING_URI
cd "$ROOT"
PY="${PYTHON:-python}"
ARCHIVE="$ROOT/../shared/data/cifar10-jpeg.tar.gz"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
declare -A RC SECS

step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.log, record rc/secs
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/device_check.log"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$((SECONDS - t0))
  echo "   exit ${RC[$name]} after ${SECS[$name]}s" | tee -a "$OUT/device_check.log"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported(), 'ray', ray.__version__)"
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# the CIFAR-10 JPEG tree, unpacked once (tmpfs when it has room)
CACHE="$SCRATCH"; [ -d /dev/shm ] && CACHE="$(mktemp -d /dev/shm/device-check.XXXXXX)" && trap 'rm -rf "$SCRATCH" "$CACHE"' EXIT
step unpack 120 "$PY" -c "from pathlib import Path; from trainables.data import unpack_archive; print(unpack_archive(Path('$ARCHIVE'), Path('$CACHE')))"
DATA="folder:$CACHE/cifar10-jpeg"

TRIAL=(--dataset "$DATA" --device cuda --depth 20 --width 16 --bits 4 --batch-size 128
       --attack-steps 10 --eval-steps 10 --subset-test 2000 --precision bf16 --seed 0)
step trial 180 "$PY" -m trainables.train "${TRIAL[@]}" --epochs 1 --out "$SCRATCH/trial"
cp "$SCRATCH/trial/metrics.json" "$OUT/trial_metrics.json" 2>/dev/null
step load_on_cpu 60 env CUDA_VISIBLE_DEVICES="" "$PY" -c "
import torch, sys
assert not torch.cuda.is_available()
ck = torch.load('$SCRATCH/trial/checkpoint.pt', map_location='cpu', weights_only=False)
bad = [k for k, v in ck['model'].items() if v.device.type != 'cpu']
print('checkpoint epoch', ck['epoch'], 'rng keys', sorted(ck['rng']), 'non-cpu tensors', bad)
sys.exit(1 if bad else 0)"

step tests 120 "$PY" -m pytest -q -x tests/test_device.py "tests/test_train_cli.py::test_kill_and_resume_matches_uninterrupted_run"

step sweep 150 "$PY" -m search.pareto --name packed --trials 2 --max-concurrent 2 --gpus-per-trial 0.5 \
  --cpus-per-trial 2 --epochs 1 --dataset "$DATA" --subset-train 5000 --subset-test 1000 \
  --set device=cuda --set depth=20 --set width=16 --set bits=4 --set precision=bf16 --set cw=false --quiet \
  --storage-path "$SCRATCH/sweeps" --tracking-uri "sqlite:///$SCRATCH/mlflow.db"
cp "$SCRATCH/sweeps/packed/trials.parquet" "$OUT/sweep_trials.parquet" 2>/dev/null

step throughput 200 "$PY" benchmarks/gpu_throughput.py --device cuda --images 8192 --rounds 2 --packed-epochs 1
tail -n 1 "$OUT/throughput.log" > "$OUT/gpu_throughput.json" 2>/dev/null

"$PY" - "$OUT" <<EOF
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        text = (out / name).read_text()
    except OSError:
        return None
    for candidate in (text, (text.strip().splitlines() or [""])[-1]):
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    return None
rc = {$(for k in "${!RC[@]}"; do printf '"%s": %s, ' "$k" "${RC[$k]}"; done)}
secs = {$(for k in "${!SECS[@]}"; do printf '"%s": %s, ' "$k" "${SECS[$k]}"; done)}
summary = {"ok": all(v == 0 for v in rc.values()), "rc": rc, "seconds": secs,
           "env": (out / "env.txt").read_text().splitlines(),
           "trial": load("trial_metrics.json"),
           "throughput": load("gpu_throughput.json")}
(out / "device_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary))
EOF
