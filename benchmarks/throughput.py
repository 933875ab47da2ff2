"""Training throughput of the lth engine against a PyTorch reference and the machine's matmul peak.

Workload (Frankle & Carbin 2019, LeNet-300-100): 784-300-100-10 MLP, batch 60, Adam lr 1.2e-3,
60,000 x 784 float32 random inputs with random labels, random masks at 50% density on every kernel
(biases unmasked). Measured in one process:

(a) lth, one network: the real ``lth.train.Engine`` (``engine.init`` + ``engine.run``) with the data
    set resident; each timed ``engine.run`` call is one compiled ``lax.scan`` segment of ``--steps``
    steps (``eval_every`` is larger than the run and the val/test splits are empty, so nothing but
    training is timed);
(b) lth, a population of K networks (``--population``, default 8) trained by the same engine in one
    compiled program per segment, each member with its own data order (``data_seeds = 0..K-1``);
    ``--member-batch`` sets ``train.member_batch`` (auto: on CPU the members run one after another
    inside the program, on GPU all are vmapped; ``all`` vmaps them on CPU too);
(c) a PyTorch reference in the style of the usual PyTorch LTH loop: ``DataLoader(TensorDataset,
    batch_size=60, shuffle=True)``, forward, ``loss.backward()``, ``Adam.step()``, then the mask
    re-applied by multiplying the weights in place under ``torch.no_grad()``;
    ``torch.set_num_threads(2)``. (c') is the same loop with each batch taken by indexing a random
    permutation instead of through the DataLoader: printed for information, not used in the ratios;
(d) the practical peak: a float32 2048 x 2048 numpy matmul, GFLOP/s = 2 n^3 / t.

Timing. Every configuration first runs one untimed segment of the timed length (for lth this is the
compile; an lth segment of another length would compile again). Then ``--repeats`` rounds each time
one segment of every configuration, interleaved (a, b..., c, c', d, a, b, ...), and the best segment
of each is kept: the machine is shared, so the best is the least disturbed, and interleaving keeps a
burst of foreign load from favouring one configuration.

FLOPs. A training step of one network is counted as 3 x the forward matmul FLOPs,
3 x 2 x 60 x (784*300 + 300*100 + 100*10) = 95.8 MFLOP (the usual convention: backward = 2 x
forward). Both frameworks really skip the input gradient of the first layer, so the FLOPs actually
executed are about 2.1 x forward; the GFLOP/s printed here are by the 3 x convention.

A population step trains K networks, so a population delivers K x (lockstep steps/s) network-steps
per second: that "per-network" throughput is what is compared with the PyTorch loop (which trains
one network at a time):

    ratio_single     = (a) steps/s / (c) steps/s
    ratio_population = (b) network-steps/s / (c) steps/s
    peak_fraction    = (b) GFLOP/s / (d) GFLOP/s

``--population 1,8,64`` measures several K (benchmarks/gpu.sh); the ratio lines then use the
largest K. Populations larger than 8 run proportionally fewer steps per segment (at least 250).
torch is optional (the ``bench`` extra): ``pip install torch==2.13.0`` installs the CPU build.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

N_TRAIN, DIM, CLASSES, BATCH, LR, DENSITY = 60_000, 784, 10, 60, 1.2e-3, 0.5
LAYERS = ((784, 300), (300, 100), (100, 10))
FLOPS_PER_STEP = 3 * 2 * BATCH * sum(i * o for i, o in LAYERS)
TORCH_HINT = ("torch is not installed, so the PyTorch reference (c) and the ratio_single / "
              "ratio_population lines are skipped. Install the CPU build with `pip install torch==2.13.0` "
              "(a plain `pip install torch` would download a multi-GB CUDA build).")


def log(*a):
    print(*a, flush=True)


def make_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_TRAIN, DIM), dtype=np.float32)
    y = rng.integers(0, CLASSES, N_TRAIN).astype(np.int32)
    return x, y


def gflops(network_steps_per_s: float) -> float:
    return network_steps_per_s * FLOPS_PER_STEP / 1e9


def load_engine_module(spec: str):
    """``lth.train`` by default; a ``.py`` path loads an experimental copy of the engine (profiling)."""
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        s = importlib.util.spec_from_file_location(f"_bench_engine_{path.stem}", path)
        mod = importlib.util.module_from_spec(s)
        sys.modules[s.name] = mod
        s.loader.exec_module(mod)
        return mod
    return importlib.import_module(spec)


# ----------------------------------------------------------------------------- (a), (b): lth

class LthRunner:
    """A population of k LeNet-300-100s in the lth engine; ``segment()`` times one ``engine.run``."""

    def __init__(self, x, y, k: int, steps: int, rounds: int, engine_mod, knobs: dict,
                 member_batch: int | None = None):
        import jax
        import jax.numpy as jnp

        from lth.config import ModelConfig, TrainConfig
        from lth.models import build_model
        from lth.train import init_population

        self.jax, self.k, self.steps = jax, k, steps
        model = build_model(ModelConfig(name="lenet_300_100"), CLASSES, (DIM,))
        ex, ey = np.zeros((0, DIM), np.float32), np.zeros((0,), np.int32)
        data = SimpleNamespace(x_train=x, y_train=y, x_val=ex, y_val=ey, x_test=ex, y_test=ey)
        total = steps * (rounds + 1)
        cfg = TrainConfig(optimizer="adam", lr=LR, batch_size=BATCH, steps=total, eval_every=10 * total,
                          member_batch=member_batch)
        self.engine = engine_mod.Engine(model, data, cfg, **knobs)
        params, bs = init_population(model, jax.random.split(jax.random.key(0), k), (DIM,))
        rng = np.random.default_rng(1)
        masks = jax.tree.map(  # kernels (ndim 3 with the population axis) at 50%, biases kept
            lambda p: jnp.asarray(rng.random(p.shape) < DENSITY if p.ndim >= 3 else np.ones(p.shape, bool)),
            params)
        self.state = self.engine.init(params, bs, masks, jax.random.split(jax.random.key(2), k))
        self.seeds = list(range(k))
        self.pos = 0
        t0 = time.perf_counter()
        self.segment()  # compiles the segment program
        self.first_s = time.perf_counter() - t0

    def segment(self) -> float:
        t0 = time.perf_counter()
        res = self.engine.run(self.state, self.seeds, start=self.pos, stop=self.pos + self.steps)
        self.state = self.jax.block_until_ready(res.state)
        dt = time.perf_counter() - t0
        self.pos += self.steps
        loss = [r["loss"] for r in res.records if r["split"] == "train"]
        if not np.all(np.isfinite(loss)):
            raise RuntimeError(f"lth K={self.k}: non-finite train loss {loss}")
        return dt


# ----------------------------------------------------------------------------- (c): torch

class TorchRunner:
    """The standard PyTorch LTH loop (one network); ``segment()`` times ``steps`` steps."""

    def __init__(self, x, y, steps: int, dataloader: bool = True):
        import torch
        import torch.nn as nn
        import torch.nn.functional as F
        from torch.utils.data import DataLoader, TensorDataset

        torch.set_num_threads(2)
        torch.manual_seed(0)
        self.torch, self.steps = torch, steps
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
            with torch.no_grad():  # re-apply the mask: pruned weights back to exactly zero
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

        self.train_step, self.batches = train_step, batches()
        t0 = time.perf_counter()
        self.segment()  # warm-up (allocator, thread pool)
        self.first_s = time.perf_counter() - t0

    def segment(self) -> float:
        t0 = time.perf_counter()
        for _ in range(self.steps):
            xb, yb = next(self.batches)
            loss = self.train_step(xb, yb)
        value = loss.item()
        dt = time.perf_counter() - t0
        if not np.isfinite(value):
            raise RuntimeError("torch: non-finite loss")
        return dt


# ----------------------------------------------------------------------------- (d): peak

class PeakRunner:
    """float32 n x n numpy matmul; ``segment()`` is the best of ``reps`` products (seconds per product)."""

    def __init__(self, n: int = 2048, reps: int = 3):
        rng = np.random.default_rng(0)
        self.n, self.reps = n, reps
        self.a = rng.standard_normal((n, n), dtype=np.float32)
        self.b = rng.standard_normal((n, n), dtype=np.float32)
        self.c = np.empty((n, n), np.float32)
        self.segment()

    def segment(self) -> float:
        best = float("inf")
        for _ in range(self.reps):
            t0 = time.perf_counter()
            np.matmul(self.a, self.b, out=self.c)
            best = min(best, time.perf_counter() - t0)
        return best

    def gflops(self, dt: float) -> float:
        return 2 * self.n ** 3 / dt / 1e9


class DevicePeakRunner:
    """float32 n x n matmul in jax on the default (accelerator) device; only when it is not the CPU."""

    def __init__(self, n: int = 8192, reps: int = 5):
        import jax
        import jax.numpy as jnp

        self.jax, self.n, self.reps = jax, n, reps
        k1, k2 = jax.random.split(jax.random.key(0))
        self.a = jax.random.normal(k1, (n, n), jnp.float32)
        self.b = jax.random.normal(k2, (n, n), jnp.float32)
        self.f = jax.jit(jnp.matmul)
        self.segment()

    def segment(self) -> float:
        best = float("inf")
        for _ in range(self.reps):
            t0 = time.perf_counter()
            self.f(self.a, self.b).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        return best

    def gflops(self, dt: float) -> float:
        return 2 * self.n ** 3 / dt / 1e9


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per timed segment (default 2000; 300 with --quick)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved timing rounds, best segment kept (default 3; 2 with --quick)")
    ap.add_argument("--population", default="8",
                    help="population size K, or a comma-separated list such as 1,8,64 (ratios use the largest)")
    ap.add_argument("--member-batch", default="auto",
                    help="train.member_batch: members vmapped together (auto: 1 on CPU, all on GPU; "
                         "'all' vmaps the whole population)")
    ap.add_argument("--quick", action="store_true", help="short segments: a smoke run, noisier figures")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument("--engine", default="lth.train",
                    help="module or .py file providing Engine (default lth.train; for profiling copies)")
    ap.add_argument("--knobs", default="{}", help="JSON keyword arguments for Engine (experimental copies only)")
    args = ap.parse_args(argv)
    steps = args.steps or (300 if args.quick else 2000)
    rounds = args.repeats or (2 if args.quick else 3)
    try:
        pops = sorted({int(p) for p in str(args.population).split(",") if p.strip()})
    except ValueError:
        pops = []
    if not pops or pops[0] < 1:
        ap.error(f"--population {args.population!r}: positive integers, e.g. 8 or 1,8,64")
    knobs = json.loads(args.knobs)
    mb = {"auto": None, "all": 1 << 30}.get(args.member_batch)
    if mb is None and args.member_batch != "auto":
        try:
            mb = int(args.member_batch)
        except ValueError:
            ap.error(f"--member-batch {args.member_batch!r}: auto, all or an integer >= 1")

    import jax

    engine_mod = load_engine_module(args.engine)
    log(f"workload: LeNet-300-100, batch {BATCH}, Adam lr {LR}, {N_TRAIN} x {DIM} float32 random data, "
        f"kernel masks {DENSITY:.0%} dense; {FLOPS_PER_STEP / 1e6:.1f} MFLOP per network-step (3 x forward)")
    log(f"jax {jax.__version__} on {jax.default_backend()} ({len(jax.devices())} x {jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs, member_batch {args.member_batch}, engine {args.engine}{' ' + json.dumps(knobs) if knobs else ''}")
    log(f"timing: {steps} steps per segment, best of {rounds} interleaved rounds after an untimed "
        f"warm-up (compile) segment")

    torch_mod = None
    if not args.no_torch:
        try:
            import torch as torch_mod
        except ImportError:
            log(f"note: {TORCH_HINT}")

    x, y = make_data()
    runners: dict[str, object] = {}
    k_steps = {}
    for k in sorted(set([1] + pops)):
        k_steps[k] = steps if k <= 8 else max(250, steps * 8 // k)
        runners[f"k{k}"] = r = LthRunner(x, y, k, k_steps[k], rounds, engine_mod, knobs, mb)
        log(f"  lth K={k}: compile + first segment of {k_steps[k]} steps {r.first_s:.1f} s")
    if torch_mod is not None:
        runners["torch"] = r = TorchRunner(x, y, steps, dataloader=True)
        runners["torch_direct"] = TorchRunner(x, y, steps, dataloader=False)
        log(f"  torch {torch_mod.__version__}: warm-up segment {r.first_s:.1f} s, {torch_mod.get_num_threads()} threads")
    runners["peak"] = peak = PeakRunner()
    backend = jax.default_backend()
    if backend != "cpu":
        runners["device_peak"] = DevicePeakRunner()

    best = {name: float("inf") for name in runners}
    for _ in range(rounds):
        for name, r in runners.items():
            best[name] = min(best[name], r.segment())

    sps = {name: (k_steps[int(name[1:])] if name.startswith("k") else steps) / dt
           for name, dt in best.items() if not name.endswith("peak")}
    peak_gf = peak.gflops(best["peak"])
    single = sps["k1"]
    log(f"(a) lth single network:      {single:9.1f} steps/s                          {gflops(single):7.2f} GFLOP/s")
    for k in pops:
        lock = sps[f"k{k}"]
        log(f"(b) lth population K={k:<5d}  {lock:9.1f} steps/s x {k:<3d} = {lock * k:9.1f} network-steps/s  "
            f"{gflops(lock * k):7.2f} GFLOP/s")
    if torch_mod is not None:
        log(f"(c) torch LTH loop:          {sps['torch']:9.1f} steps/s                          "
            f"{gflops(sps['torch']):7.2f} GFLOP/s")
        log(f"(c') torch, no DataLoader:   {sps['torch_direct']:9.1f} steps/s                          "
            f"{gflops(sps['torch_direct']):7.2f} GFLOP/s  (information only)")
    else:
        log(f"(c) skipped: {'--no-torch' if args.no_torch else TORCH_HINT}")
    log(f"(d) numpy 2048^2 f32 matmul:                                               {peak_gf:7.2f} GFLOP/s")

    kmax = pops[-1]
    pop_net = sps[f"k{kmax}"] * kmax
    if "device_peak" in runners:
        dev_gf = runners["device_peak"].gflops(best["device_peak"])
        log(f"(d') jax 8192^2 f32 matmul on {backend}:                                    {dev_gf:7.2f} GFLOP/s")
        log(f"device_peak_fraction: {gflops(pop_net) / dev_gf:.3f} (K={kmax} against (d'); the lines below use (d))")
    if torch_mod is not None:
        log(f"ratio_single: {single / sps['torch']:.2f}")
        log(f"ratio_population: {pop_net / sps['torch']:.2f}")
    log(f"peak_fraction: {gflops(pop_net) / peak_gf:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
