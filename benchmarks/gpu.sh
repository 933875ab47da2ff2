#!/usr/bin/env bash
# Throughput benchmark on a GPU machine: LeNet-300-100 populations of K = 1, 8, 64 on the GPU, and
# the convnet rows (Conv-2, ResNet-20; lth against a bare jitted step, with the segment strategy
# auto picks and the other one, so the check shows whether "scan" is right on the GPU too). The
# PyTorch reference and the numpy peak stay on the CPU, as on a laptop.
#
#   bash benchmarks/gpu.sh                 # extra arguments go to throughput.py, e.g. --quick
#
# Then inference speed per format (lth speed): short IMP runs of LeNet-300-100 on Fashion-MNIST
# (tickets 100% -> 3.6%), its 2:4 ticket (prune.granularity = n:m) and Conv-2, each level timed at
# batch 1 and 256 as dense + mask, BCOO, int8 program, N:M (CSR is CPU only), then `lth report`
# into $SPEED_OUT/figures (latency_vs_density*, speed.md, crossover.md). SPEED=0 skips this part.
#
# Installs jax's CUDA plugin (jax[cuda12], the same version as the installed jax) when jax sees no
# GPU; that needs pip to reach an index or a wheel folder (PIP_FIND_LINKS). torch is optional.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # lth from this checkout, installed or not

has_gpu() { python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; }

if ! has_gpu; then
    ver=$(python -c 'import jax; print(jax.__version__)' 2>/dev/null || true)
    echo "jax sees no GPU; installing jax[cuda12]${ver:+==$ver}" >&2
    pip install -q "jax[cuda12]${ver:+==$ver}" || { echo "pip install jax[cuda12] failed (no index reachable?)" >&2; exit 1; }
    has_gpu || { echo "jax still sees no GPU after installing jax[cuda12]; is a CUDA driver present (nvidia-smi)?" >&2; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python -c 'import jax; print("jax", jax.__version__, jax.devices())'
python benchmarks/throughput.py --population 1,8,64 --conv --conv-steps 40 "$@"

[ "${SPEED:-1}" = 0 ] && exit 0
out=${SPEED_OUT:-/tmp/lth_speed_gpu}
common=(--out "$out" --set train.epochs=1 --set 'seeds=[0]' --set 'arms=["ticket"]' --set log.wandb=disabled
        --set train.eval_every=916 --no-progress)
python -m lth.cli lottery experiments/lenet300_fmnist.toml "${common[@]}" --set prune.levels=15
python -m lth.cli lottery experiments/lenet300_fmnist.toml "${common[@]}" --set name=lenet300_fmnist_2of4 \
    --set prune.granularity=n:m --set prune.n=2 --set prune.m=4 --set prune.levels=2
python -m lth.cli lottery experiments/lenet300_fmnist.toml "${common[@]}" --set name=conv2_fmnist \
    --set model.name=conv2 --set train.lr=2e-4 --set train.epochs=none --set train.steps=300 \
    --set train.eval_every=300 --set prune.levels=15 --set prune.conv_rate=0.2
for run in "$out"/*/; do
    python -m lth.cli speed "$run" --batch 1,256
done
python -m lth.cli report "$out" --out "$out/figures"
cat "$out/figures/crossover.md"
