#!/usr/bin/env bash
# The GPU issue's one device check, prepared on a CPU: about 6-8 minutes on one H100 or H200,
# 10 at most (each part has a time limit: 150 + 90 + 210 + 150 s).
#
#     bash benchmarks/gpu_check.sh                   # from the repository root; writes into $OUT
#     OUT=/tmp/check GAN_DATA=/data bash benchmarks/gpu_check.sh
#
# It needs MNIST's raw files under $GAN_DATA/MNIST/raw and a folder of face photos at
# $GAN_DATA/faces (default GAN_DATA=.gpu/data; without MNIST the scripts fall back to the bundled
# mnist-mini). It runs, each part under its own time limit so that a slow part cannot lose the
# others, and writes at most eight files into $OUT (default gpu-check/):
#   device.txt        the GPU, driver, torch, triton, the commit
#   tests.txt         tests/test_kernels.py (the kernels compiled on this GPU, the sync-debug test)
#                     and tests/test_cuda_graphs.py (captured step = eager, resume, no host sync)
#   kernels.txt       benchmarks/kernels.py --no-compile: the kernels against eager PyTorch, eager
#                     and replayed from a CUDA graph
#   train_speed.md    benchmarks/train_speed.py --preset gpu-check: dcgan, wgan, wgan_gp at 32 and
#                     64 px at the papers' batch sizes, eager / --cuda-graph / --amp, kernels on/off
#   faces.txt         wgan_gp.py --data <faces> --steps 2000 --cuda-graph: its log
#   faces.png         that run's last sample grid
#   summary.txt       every part's exit status and seconds
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
DATA=${GAN_DATA:-.gpu/data}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
: > "$OUT/summary.txt"

part() {                      # part NAME SECONDS COMMAND...: run it, note its status and time
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    timeout --signal=TERM --kill-after=20 "$limit" "$@"
    local rc=$?
    printf '%-12s exit %3d  %4d s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/summary.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

part tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_cuda_graphs.py \
    > "$OUT/tests.txt" 2>&1
tail -n 5 "$OUT/tests.txt"

part kernels 90 $PY benchmarks/kernels.py --no-compile > "$OUT/kernels.txt" 2>&1
tail -n 60 "$OUT/kernels.txt"

part train_speed 210 $PY benchmarks/train_speed.py --preset gpu-check --steps 200 --log-every 40 \
    --data-root "$DATA" --markdown "$OUT/train_speed.md" > /dev/null 2>&1
cat "$OUT/train_speed.md"

faces=$(mktemp -d)
part faces 150 $PY wgan_gp.py --data "$DATA/faces" --steps 2000 --cuda-graph --log-every 200 \
    --out "$faces/run" > "$OUT/faces.txt" 2>&1
grid=$(ls "$faces"/run/samples/*.png 2>/dev/null | tail -n 1)
[ -n "$grid" ] && cp "$grid" "$OUT/faces.png"
tail -n 4 "$OUT/faces.txt"

cat "$OUT/summary.txt"
