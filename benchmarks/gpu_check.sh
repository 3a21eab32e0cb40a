#!/usr/bin/env bash
# The GPU issue's one device check, prepared on a CPU: at most 480 s on one H100 or H200, every
# part's time limit and kill grace included (printed first), so that the check, a fix and a rerun
# fit in 15 minutes of GPU time with a machine start.
#
#     bash benchmarks/gpu_check.sh                   # from the repository root; writes into $OUT
#     bash benchmarks/gpu_check.sh capture speed     # only these parts (a rerun after a fix)
#     bash benchmarks/gpu_check.sh speed64           # the optional second check: 64 px speed
#     PYTHON=echo bash benchmarks/gpu_check.sh       # a dry run without a GPU: the limits, the
#                                                    # data check and each command
#
# Data (GAN_DATA, default .gpu/data): MNIST's raw files under $GAN_DATA/MNIST/raw, required (else
# every MNIST load would try torchvision's download, which waits forever without a network), and
# face photos at $GAN_DATA/faces, optional (the faces part is skipped without them). Pack them with
# `bash ../shared/tools/gpu-prep.sh` and name .gpu in the device run's carry.
#
# Parts, run in this order, each under its own time limit (so that a slow one cannot lose the
# others), each writing into $OUT (default gpu-check/):
#   device        device.txt        the GPU, driver, torch, triton, the commit
#   capture       capture.txt       tests/test_cuda_graphs.py: captured step = eager, resume, no
#                                   host sync, a step that cannot be captured
#   kernel-tests  kernel-tests.txt  tests/test_kernels.py: the kernels compiled on this GPU (about
#                                   60 cold compilations, after the capture tests for that reason)
#   kernels       kernels.txt       benchmarks/kernels.py --no-compile: the kernels against eager
#                                   PyTorch, eager and replayed from a CUDA graph
#   speed         train_speed.md    benchmarks/train_speed.py --preset gpu-check (its output in
#                                   train_speed.txt): dcgan.py and wgan_gp.py, eager vs
#                                   --cuda-graph, batch 128 and 64, 32 px MNIST (wgan_gp.py with
#                                   GAN_KERNELS=triton and =torch)
#   faces         faces.txt, .png   wgan_gp.py --cuda-graph on the faces: its log and last grid
#   speed64       train_speed_64.md (only when named) --preset gpu-check-64: 64 px, with wgan.py
# and summary.txt: every part's exit status and seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
DATA=${GAN_DATA:-.gpu/data}
PY=${PYTHON:-python3}
GRACE=10                      # seconds between timeout's TERM and its KILL
declare -A LIMIT=([device]=15 [capture]=65 [kernel-tests]=85 [kernels]=55 [speed]=140 [faces]=60
                  [speed64]=170)
ORDER=(device capture kernel-tests kernels speed faces speed64)
DEFAULT=(device capture kernel-tests kernels speed faces)
if [ $# -gt 0 ]; then parts=("$@"); else parts=("${DEFAULT[@]}"); fi
total=0
for p in "${parts[@]}"; do
    [ -n "${LIMIT[$p]:-}" ] || { echo "gpu_check.sh: error: no part '$p' (${ORDER[*]})" >&2; exit 2; }
    printf '  %-13s limit %3d s + %d s kill grace\n' "$p" "${LIMIT[$p]}" "$GRACE"
    total=$((total + LIMIT[$p] + GRACE))
done
echo "  total         at most $total s of limits and grace"

wants() { [[ " ${parts[*]} " == *" $1 "* ]]; }
if wants speed; then
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte; do
        [ -e "$DATA/MNIST/raw/$f" ] || [ -e "$DATA/MNIST/raw/$f.gz" ] || {
            echo "gpu_check.sh: error: no $DATA/MNIST/raw/$f(.gz): pack .gpu/ with" \
                 "bash ../shared/tools/gpu-prep.sh and name .gpu in the run's carry" >&2
            exit 1
        }
    done
fi

mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PY
echo "== $(date -u '+%F %T UTC'), parts: ${parts[*]}" >> "$OUT/summary.txt"
t_start=$SECONDS

part() {                      # part NAME FILE COMMAND...: COMMAND > $OUT/FILE under NAME's limit
    local name=$1 file=$2 t0=$SECONDS
    shift 2
    wants "$name" || return 1
    timeout --signal=TERM --kill-after=$GRACE "${LIMIT[$name]}" "$@" > "$OUT/$file" 2>&1
    local rc=$? note=""
    [ $rc -eq 124 ] && note=" (its time limit)"
    [ $rc -eq 137 ] && note=" (killed after the grace)"
    printf '%-13s exit %3d  %4d s%s\n' "$name" "$rc" "$((SECONDS - t0))" "$note" \
        | tee -a "$OUT/summary.txt"
}

part device device.txt bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || echo "no nvidia-smi"
    $PY -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__)"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"' \
    && cat "$OUT/device.txt"

part capture capture.txt $PY -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py \
    && tail -n 5 "$OUT/capture.txt"

part kernel-tests kernel-tests.txt $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    && tail -n 5 "$OUT/kernel-tests.txt"

part kernels kernels.txt $PY benchmarks/kernels.py --no-compile && tail -n 60 "$OUT/kernels.txt"

# 150 generator steps a run, a log line every 25: the median of 5 steady intervals per row
part speed train_speed.txt $PY benchmarks/train_speed.py --preset gpu-check --steps 150 \
    --log-every 25 --data-root "$DATA" --markdown "$OUT/train_speed.md" \
    && { cat "$OUT/train_speed.md" 2>/dev/null || tail -n 20 "$OUT/train_speed.txt"; }

if wants faces && [ ! -d "$DATA/faces" ]; then
    echo "faces         skipped: no $DATA/faces" | tee -a "$OUT/summary.txt"
elif wants faces; then
    # as many of 1000 steps as the limit allows (its TERM saves last.pt), a grid every 250
    faces=$(mktemp -d)
    part faces faces.txt $PY wgan_gp.py --data "$DATA/faces" --steps 1000 --cuda-graph \
        --log-every 100 --sample-every 250 --out "$faces/run" && {
        grid=$(ls "$faces"/run/samples/*.png 2>/dev/null | tail -n 1)
        [ -n "$grid" ] && cp "$grid" "$OUT/faces.png"
        tail -n 4 "$OUT/faces.txt"
    }
fi

part speed64 train_speed_64.txt $PY benchmarks/train_speed.py --preset gpu-check-64 --steps 150 \
    --log-every 25 --data-root "$DATA" --markdown "$OUT/train_speed_64.md" \
    && { cat "$OUT/train_speed_64.md" 2>/dev/null || tail -n 20 "$OUT/train_speed_64.txt"; }

echo "all parts: $((SECONDS - t_start)) s (at most $total)" | tee -a "$OUT/summary.txt"
