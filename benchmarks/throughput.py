"""Training throughput of the lth engine against a PyTorch reference and the machine's matmul peak.

Workload (Frankle & Carbin 2019, LeNet-300-100): 784-300-100-10 MLP, batch 60, Adam lr 1.2e-3,
60,000 x 784 float32 random inputs with random labels, masks at 50% density on every kernel
(biases unmasked). Measured in one process:

(a) lth, one network: the real ``lth.train.Engine`` (``engine.init`` + ``engine.run``), data set
    resident, one ``lax.scan`` segment of ``--steps`` steps between boundaries;
(b) lth, a population of K networks (``--population``, default 8) trained in lockstep by the same
    engine, each member with its own data order (``data_seeds = 0..K-1``);
(c) a PyTorch reference in the style of the usual PyTorch LTH loop: ``DataLoader(TensorDataset,
    batch_size=60, shuffle=True)``, forward, ``loss.backward()``, ``Adam.step()``, then the mask
    re-applied by multiplying the weights in place under ``torch.no_grad()``;
    ``torch.set_num_threads(2)``. (c') is the same loop with the batch taken by direct indexing of a
    permutation instead of the DataLoader; it is printed for information only;
(d) the practical peak: a float32 2048 x 2048 numpy matmul, GFLOP/s = 2 n^3 / t.

Timing: each configuration first runs one segment of the same length (this compiles), then the best
of ``--repeats`` timed segments is kept (the machine is shared, so the best is the least disturbed).
Evaluation is excluded (the engine gets empty val/test splits, so ``run`` only trains).

FLOPs per training step (one network) = 3 x forward matmul FLOPs
= 3 x 2 x 60 x (784*300 + 300*100 + 100*10) = 95.8 MFLOP (backward = 2 x forward).

A population step trains K networks, so its throughput in network-steps/s is K x its lockstep
steps/s; that is the "per-network" figure compared with the PyTorch loop (which trains one network):

    ratio_single     = (a) steps/s / (c) steps/s
    ratio_population = (b) network-steps/s / (c) steps/s
    peak_fraction    = (b) GFLOP/s / (d) GFLOP/s

``--population 1,8,64`` measures several K (gpu.sh); the ratio lines then use the last K.
torch is optional (``pip install torch==2.13.0``, the CPU build; see the message when it is missing).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

N_TRAIN, DIM, CLASSES, BATCH, LR, DENSITY = 60_000, 784, 10, 60, 1.2e-3, 0.5
LAYERS = ((784, 300), (300, 100), (100, 10))
FLOPS_PER_STEP = 3 * 2 * BATCH * sum(i * o for i, o in LAYERS)
TORCH_HINT = ("torch is not installed: (c) and the ratio_single / ratio_population lines need it. "
              "Install the CPU build with `pip install torch==2.13.0` (or `pip install -e \".[bench]\"`); "
              "a plain `pip install torch` would download a multi-GB CUDA build.")


def log(*a):
    print(*a, flush=True)


def make_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_TRAIN, DIM), dtype=np.float32)
    y = rng.integers(0, CLASSES, N_TRAIN).astype(np.int32)
    return x, y


def load_engine_module(spec: str):
    """``lth.train`` by default; a file path loads an experimental copy of the engine (profiling)."""
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        s = importlib.util.spec_from_file_location(f"_bench_engine_{path.stem}", path)
        mod = importlib.util.module_from_spec(s)
        sys.modules[s.name] = mod
        s.loader.exec_module(mod)
        return mod
    return importlib.import_module(spec)


# ----------------------------------------------------------------------------- (a), (b): lth

def bench_lth(x, y, k: int, steps: int, repeats: int, engine_mod) -> float:
    """Best lockstep steps/s of a population of k (k = 1: a single network)."""
    import jax
    import jax.numpy as jnp

    from lth.config import ModelConfig, TrainConfig
    from lth.models import build_model
    from lth.train import init_population

    model = build_model(ModelConfig(name="lenet_300_100"), CLASSES, (DIM,))
    empty_x, empty_y = np.zeros((0, DIM), np.float32), np.zeros((0,), np.int32)
    data = SimpleNamespace(x_train=x, y_train=y, x_val=empty_x, y_val=empty_y, x_test=empty_x, y_test=empty_y)
    total = steps * (repeats + 1)
    cfg = TrainConfig(optimizer="adam", lr=LR, batch_size=BATCH, steps=total, eval_every=10 * total)
    engine = engine_mod.Engine(model, data, cfg)

    params, bs = init_population(model, jax.random.split(jax.random.key(0), k), (DIM,))
    rng = np.random.default_rng(1)
    masks = jax.tree.map(
        lambda p: jnp.asarray(rng.random(p.shape) < DENSITY if p.ndim >= 3 else np.ones(p.shape, bool)), params)
    state = engine.init(params, bs, masks, jax.random.split(jax.random.key(2), k))
    seeds = list(range(k))

    best = float("inf")
    for r in range(repeats + 1):  # segment 0 compiles and warms up
        t0 = time.perf_counter()
        res = engine.run(state, seeds, start=r * steps, stop=(r + 1) * steps)
        state = jax.block_until_ready(res.state)
        dt = time.perf_counter() - t0
        if r:
            best = min(best, dt)
    loss = [rec["loss"] for rec in res.records if rec["split"] == "train"]
    if not np.all(np.isfinite(loss)):
        raise RuntimeError(f"lth K={k}: non-finite train loss {loss}")
    return steps / best


# ----------------------------------------------------------------------------- (c): torch

def bench_torch(x, y, steps: int, repeats: int, dataloader: bool = True) -> float:
    """Best steps/s of the standard PyTorch LTH loop (one network)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    masks = {name: (torch.rand_like(p) < DENSITY).float()
             for name, p in model.named_parameters() if name.endswith("weight")}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    model.train()

    def train_step(xb, yb):
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        with torch.no_grad():  # re-apply the mask: pruned weights back to zero
            for name, p in model.named_parameters():
                if name in masks:
                    p.mul_(masks[name])
        return loss

    if dataloader:
        loader = DataLoader(TensorDataset(xt, yt), batch_size=BATCH, shuffle=True)

        def batches():
            while True:
                yield from loader
    else:
        def batches():
            while True:
                perm = torch.randperm(N_TRAIN)
                for i in range(N_TRAIN // BATCH):
                    j = perm[i * BATCH:(i + 1) * BATCH]
                    yield xt[j], yt[j]

    it = batches()
    best = float("inf")
    for r in range(repeats + 1):  # segment 0 warms up
        t0 = time.perf_counter()
        for _ in range(steps):
            xb, yb = next(it)
            loss = train_step(xb, yb)
        loss.item()
        dt = time.perf_counter() - t0
        if r:
            best = min(best, dt)
    if not np.isfinite(loss.item()):
        raise RuntimeError("torch: non-finite loss")
    return steps / best


# ----------------------------------------------------------------------------- (d): peak

def bench_peak(n: int = 2048, repeats: int = 10) -> float:
    """Best float32 n x n numpy matmul GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    np.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


# ----------------------------------------------------------------------------- main

def gflops(network_steps_per_s: float) -> float:
    return network_steps_per_s * FLOPS_PER_STEP / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="steps per timed segment (default 2000; 300 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed segments per configuration, best kept "
                                                              "(default 3; 2 with --quick)")
    ap.add_argument("--population", default="8",
                    help="population size K, or a comma-separated list (e.g. 1,8,64); ratios use the last")
    ap.add_argument("--quick", action="store_true", help="short segments (a smoke run, noisier figures)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument("--engine", default="lth.train",
                    help="module (or .py file) providing Engine; default lth.train (for profiling copies)")
    args = ap.parse_args(argv)
    steps = args.steps or (300 if args.quick else 2000)
    repeats = args.repeats or (2 if args.quick else 3)
    pops = [int(p) for p in str(args.population).split(",") if p.strip()]
    if not pops or min(pops) < 1:
        ap.error("--population: positive integers, e.g. 8 or 1,8,64")

    import jax

    engine_mod = load_engine_module(args.engine)
    log(f"workload: LeNet-300-100, batch {BATCH}, Adam {LR}, {N_TRAIN} x {DIM} float32, masks {DENSITY:.0%} "
        f"dense; {FLOPS_PER_STEP / 1e6:.1f} MFLOP per network-step")
    log(f"timing: {steps} steps per segment, best of {repeats} after a compile/warm-up segment")
    log(f"jax {jax.__version__} on {jax.default_backend()} ({len(jax.devices())} device(s): "
        f"{jax.devices()[0].device_kind}); {os.cpu_count()} CPUs; engine {args.engine}")
    x, y = make_data()

    single = bench_lth(x, y, 1, steps, repeats, engine_mod)
    log(f"(a) lth single network:     {single:9.1f} steps/s   {gflops(single):7.2f} GFLOP/s")
    pop_results = []
    for k in pops:
        if k == 1:
            lock = single
        else:
            lock = bench_lth(x, y, k, max(steps // max(1, k // 8), 50) if k > 8 else steps, repeats, engine_mod)
        pop_results.append((k, lock))
        log(f"(b) lth population K={k:<4d}  {lock:9.1f} steps/s x {k} = {lock * k:9.1f} network-steps/s   "
            f"{gflops(lock * k):7.2f} GFLOP/s")
    k, lock = pop_results[-1]
    pop_net = lock * k

    torch_sps = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            log(f"(c) skipped: {TORCH_HINT}")
        else:
            torch_sps = bench_torch(x, y, steps, repeats, dataloader=True)
            log(f"(c) torch {torch.__version__} LTH loop:  {torch_sps:9.1f} steps/s   {gflops(torch_sps):7.2f} GFLOP/s"
                f"   (DataLoader, {torch.get_num_threads()} threads)")
            direct = bench_torch(x, y, steps, repeats, dataloader=False)
            log(f"(c') torch, no DataLoader:  {direct:9.1f} steps/s   {gflops(direct):7.2f} GFLOP/s   "
                f"(information only)")

    peak = bench_peak(repeats=5 if args.quick else 10)
    log(f"(d) numpy 2048^2 f32 matmul:  {peak:7.2f} GFLOP/s (practical peak)")

    if torch_sps is not None:
        log(f"ratio_single: {single / torch_sps:.2f}")
        log(f"ratio_population: {pop_net / torch_sps:.2f}")
    log(f"peak_fraction: {gflops(pop_net) / peak:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
