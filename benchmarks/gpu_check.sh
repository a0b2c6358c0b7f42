#!/usr/bin/env bash
# GPU check: bf16 training speed and memory of the GPU presets, and the whole product
# (phantom -> prepare -> train -> pseudo-healthy -> embed) on one CUDA GPU.
#
#   bash benchmarks/gpu_check.sh OUT
#
# Prints the tail of each part's log and writes one archive, OUT/gpu-check.tgz: logs/
# (one log per part), speed-*.json (benchmarks/train_speed.py) and run/ (the
# GPU-trained cpu-demo model, its training logs, pseudo-healthy summaries and
# embeddings), to score on any machine with benchmarks/model_quality.py.
# Each part has its own time limit; a failing part does not stop the next.
#
# Environment: PY (interpreter, default python3), PARTS (the parts to run, default
# "speed e2e"), SPEED_STEPS (timed steps, default 20), SPEED_SET / E2E_SET (extra --set
# overrides, e.g. to shrink a dry run on a CPU), SUBJECTS (phantom cohort size,
# default 30).
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT}
PY=${PY:-python3}
SPEED_STEPS=${SPEED_STEPS:-20}
SUBJECTS=${SUBJECTS:-30}
PARTS=${PARTS:-speed e2e}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/logs"
CLI="$PY -m diffca_med.cli"

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, print its tail
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" bash -c "$*" >"$W/logs/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc, $(($(date +%s) - start)) s"
    grep -v -i "warn" "$W/logs/$name.log" | tail -n 12
}

part env 40 "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c 'import torch, diffusers, monai, transformers; print(torch.__version__, torch.cuda.is_available(), diffusers.__version__, monai.__version__, transformers.__version__)'"
[[ $PARTS == *speed* ]] && part speed-brats-128 100 "$PY benchmarks/train_speed.py --config brats-128 --steps $SPEED_STEPS --warmup 3 ${SPEED_SET:-} --json $W/speed-brats-128.json"
[[ $PARTS == *speed* ]] && part speed-brats-256-latent 110 "$PY benchmarks/train_speed.py --config brats-256-latent --random-dinov3 --steps $SPEED_STEPS --warmup 3 ${SPEED_SET:-} --json $W/speed-brats-256-latent.json"
if [[ $PARTS == *e2e* ]]; then
  part phantom 60 "$CLI phantom $W/data -n $SUBJECTS --grid half --seed 0"
  part train-cpu-demo-bf16 260 "$CLI train $W/data --config cpu-demo --out $W/run --set training.mixed_precision=bf16 ${E2E_SET:-} -q && cat $W/run/train_summary.json"
  part pseudo-healthy-cuda 60 "$CLI pseudo-healthy $W/run/model $W/run/store $W/ph --split test --threshold percentile --batch-size 64 --device cuda -q"
  part embed-cuda 45 "$CLI embed $W/run/model $W/run/store $W/emb --device cuda -q"
  # The same subject on the CPU and the GPU, same seed: outputs agree up to rounding.
  part device-agreement 60 "$PY - <<'EOF'
import numpy as np, torch
from diffca_med.models import DiffCAModel
from diffca_med.data.store import SliceStore
m = DiffCAModel.from_pretrained('$W/run/model')
store = SliceStore('$W/run/store')
x = torch.as_tensor(np.asarray(store.images[:32], np.float32))
cpu = m.pseudo_healthy(x, seed=0)
m.to('cuda')
gpu = m.pseudo_healthy(x, seed=0)
assert gpu.device.type == 'cpu', gpu.device
d = (cpu - gpu).abs()
print(f'pseudo-healthy CPU vs GPU, 32 slices: max |diff| {d.max():.2e}, mean {d.mean():.2e}')
EOF"
fi
(cd "$W" && tar czf "$OUT/gpu-check.tgz" logs $(ls -d speed-*.json run/model run/logs run/train_summary.json ph/summary.csv emb 2>/dev/null))
ls -la "$OUT"
