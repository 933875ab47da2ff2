#!/usr/bin/env bash
# The checks for the day a GPU is lent, as one script under one time limit (GPU_LIMIT seconds, default
# 540: it fits a 10-minute device call with room for the machine's start):
#
#   1. the accelerator code path: tests/test_accelerator_path.py (a population vmapped whole equals
#      member-at-a-time for an MLP, a conv net with batch norm, the stability path, PTQ/QAT, a grow;
#      the 2-device test forces 2 host devices on the CPU, as in CI), on the GPU's own kernels;
#   2. the speed rows of benchmarks/throughput.py: LeNet-300-100 populations of K = 1, 8, 64 on the
#      GPU, the convnet rows (Conv-2, ResNet-20; lth against a bare jitted step, with the segment
#      strategy auto picks and the other one), --quick, no PyTorch (it stays on the CPU);
#   3. SPEED=1 (off by default; minutes): inference speed per format (lth speed) of short IMP runs
#      of LeNet-300-100, its 2:4 ticket and Conv-2 on Fashion-MNIST, then `lth report` into
#      $SPEED_OUT/figures.
#
#   bash benchmarks/gpu.sh                  # extra arguments go to throughput.py
#   GPU_LIMIT=300 bash benchmarks/gpu.sh    # a shorter budget: each step gets what is left
#
# Each step runs under `timeout` with the seconds left; a step that runs out stops the script with
# exit code 124 and says which. Nothing is installed: jax must already see the GPU (jax[cuda12]);
# ALLOW_CPU=1 runs the same steps on the CPU (a dry run of the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # lth from this checkout, installed or not
limit=${GPU_LIMIT:-540}
end=$((SECONDS + limit))

step() {  # step NAME COMMAND...: run COMMAND with the seconds left; stop the script if it fails
    local name=$1 left=$((end - SECONDS))
    shift
    if [ "$left" -le 5 ]; then
        echo "gpu.sh: no time left for $name (GPU_LIMIT=$limit s)" >&2
        exit 124
    fi
    echo "== $name ($left s left)" >&2
    timeout --kill-after=10 "$left" "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        [ "$rc" -eq 124 ] && echo "gpu.sh: $name ran out of time (GPU_LIMIT=$limit s)" >&2 \
                          || echo "gpu.sh: $name failed (exit $rc)" >&2
        exit "$rc"
    fi
}

[ "${ALLOW_CPU:-0}" = 1 ] || python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null || {
    echo "gpu.sh: jax sees no GPU (install jax[cuda12] of the installed jax's version; is nvidia-smi there?)" >&2
    exit 1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python -c 'import jax; print("jax", jax.__version__, jax.devices())'

step "accelerator path tests" python -m pytest tests/test_accelerator_path.py -q -p no:cacheprovider
step "throughput (speed rows)" python benchmarks/throughput.py --population 1,8,64 --conv --conv-steps 40 \
    --quick --no-torch "$@"

[ "${SPEED:-0}" = 1 ] || exit 0
out=${SPEED_OUT:-/tmp/lth_speed_gpu}
common=(--out "$out" --set train.epochs=1 --set 'seeds=[0]' --set 'arms=["ticket"]' --set log.wandb=disabled
        --set train.eval_every=916 --no-progress)
step "lottery lenet300" python -m lth.cli lottery experiments/lenet300_fmnist.toml "${common[@]}" --set prune.levels=15
step "lottery lenet300 2:4" python -m lth.cli lottery experiments/lenet300_fmnist.toml "${common[@]}" \
    --set name=lenet300_fmnist_2of4 --set prune.granularity=n:m --set prune.n=2 --set prune.m=4 --set prune.levels=2
step "lottery conv2" python -m lth.cli lottery experiments/lenet300_fmnist.toml "${common[@]}" --set name=conv2_fmnist \
    --set model.name=conv2 --set train.lr=2e-4 --set train.epochs=none --set train.steps=300 \
    --set train.eval_every=300 --set prune.levels=15 --set prune.conv_rate=0.2
for run in "$out"/*/; do
    step "speed $run" python -m lth.cli speed "$run" --batch 1,256
done
step "report" python -m lth.cli report "$out" --out "$out/figures"
cat "$out/figures/crossover.md"
