#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call (device time is scarce): the GPU benchmarks with their
# profiles, the `cuda` test tier and the cifar100 smoke run on CUDA. Results land in $OUT (or ./gpu-out).
#
# The machine has torch, torchvision, scipy, matplotlib and pytest but not the rest: carry it as Python 3.12 wheels
# in .whl/ (ignored by git), e.g. every package of `pip freeze` that the machine lacks (open_clip_torch, ftfy,
# wcwidth, kornia, kornia_rs, torchattacks, and the notebook stack: nbclient, nbformat, ipykernel, ipython,
# jupyter_client, ipywidgets, nbval and their dependencies), fetched with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION ...
# Then, from the repository root:   bash benchmarks/gpu_session.sh [bench_gpu.py options]
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
if ! python3 -c "import open_clip, kornia, torchattacks, nbclient, nbval" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 CLIPLAB_OFFLINE=1 MPLBACKEND=Agg
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"
  date -u; } | tee "$OUT/device.txt"

# PARTS chooses what runs (default: all), e.g. PARTS="cuda autoattack" when device time is short
PARTS=${PARTS:-"bench_gpu cuda smoke autoattack distributed"}
PYTEST=(python3 -m pytest -o addopts="" -m cuda -q -p no:cacheprovider)
if [[ " $PARTS " == *" bench_gpu "* ]]; then
    (cd benchmarks && timeout "${BENCH_TIMEOUT:-300}" python3 bench_gpu.py --profile "$OUT/profiles" --sync-check "$@") \
        2>&1 | tee "$OUT/bench_gpu.txt"
fi
if [[ " $PARTS " == *" cuda "* ]]; then
    timeout "${TESTS_TIMEOUT:-240}" "${PYTEST[@]}" tests/test_cuda.py tests/test_real_path.py -k "not smoke_run" 2>&1 \
        | tee "$OUT/pytest_cuda.txt" | tail -15
fi
if [[ " $PARTS " == *" smoke "* ]]; then
    timeout "${SMOKE_TIMEOUT:-400}" "${PYTEST[@]}" tests/test_real_path.py -k smoke_run 2>&1 \
        | tee "$OUT/pytest_smoke.txt" | tail -15
fi
if [[ " $PARTS " == *" autoattack "* ]]; then
    for model in ${AUTOATTACK_MODELS:-shapes vit}; do
        timeout "${AUTOATTACK_TIMEOUT:-180}" python3 benchmarks/bench_autoattack.py --model $model --device cuda \
            --n "${AUTOATTACK_N:-256}" 2>&1 | tee "$OUT/bench_autoattack_$model.txt"
    done
fi
if [[ " $PARTS " == *" distributed "* ]]; then
    # the NCCL path: both commands under torchrun (one process on the one GPU) and in a plain process, same settings;
    # their weights and reports land in $OUT to be compared, then DDP's own cost per fine-tuning step
    TORCHRUN=(timeout "${DISTRIBUTED_TIMEOUT:-120}" python3 -m torch.distributed.run --standalone --nproc_per_node=1)
    PLAIN=(timeout "${DISTRIBUTED_TIMEOUT:-120}" python3)
    TUNE=(finetune --profile shapes --device cuda --steps 20 --batch-size 64 --save-every 10 --eval-every 10)
    EVALUATE=(evaluate --dataset shapes --images 500 --eps 2/255,4/255 --queries 500 --device cuda --quiet)
    for launcher in TORCHRUN PLAIN; do
        declare -n run=$launcher
        "${run[@]}" -m cliplab "${TUNE[@]}" --out "$OUT/finetune-$launcher"
        "${run[@]}" -m cliplab "${EVALUATE[@]}" --out "$OUT/evaluate-$launcher"
    done 2>&1 | tee "$OUT/distributed.txt"
    (cd benchmarks && "${TORCHRUN[@]}" bench_distributed.py) 2>&1 | tee "$OUT/bench_distributed.txt"
fi
