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

Convnet rows (``--conv``, or ``--conv-only``): Conv-2 (Frankle & Carbin 2019; Adam 2e-4) at batch 60
and 128, ResNet-20 (batch norm; SGD 0.1, momentum 0.9) at batch 128, on 10,000 CIFAR-shaped
(32 x 32 x 3) random float32 images with random labels, dense masks. Per workload: (a) lth, one
network, with the segment strategy ``train.segment = auto`` picks (printed), (a') lth with the other
strategy, (b) lth, a population of 4 (own data orders), (e) a bare jitted Flax step of the same
model (a Python loop over one ``jax.jit`` step, state donated, batch gathered on the device), (c) a
PyTorch loop of the same model (NCHW, 2 threads). ``--conv-steps`` per timed segment (half for
ResNet-20), best of ``--repeats`` interleaved rounds after a warm-up segment, as above:

    conv_vs_bare_jit  = (a) steps/s / (e) steps/s
    ratio_conv_single = (a) steps/s / (c) steps/s   (ratio_conv_population: (b) network-steps/s / (c))

Transformer rows (``--transformer``, or ``--transformer-only``): the models of the two transformer recipes,
dense masks, AdamW: ``vit`` (the wider ViT named in experiments/vit_fmnist.toml: patch 4, dim 64, depth 4,
4 heads, MLP ratio 2, CLS token, 139k parameters; batch 128 of 10,000 random 28 x 28 x 1 images, lr 1e-3, weight decay 0.05) and ``gpt``
(experiments/gpt_text.toml: depth 2, dim 64, 4 heads, MLP ratio 4, context 64; batch 32 windows of a
200,000-byte random stream, lr 3e-3, weight decay 0.01, gradient clipping at norm 1). (a) lth, one network
(the real engine, one compiled segment of ``--transformer-steps`` steps); (c) a PyTorch model of the same
shapes written with torch.nn primitives (pre-LN blocks of separate q/k/v/out Linear layers,
``F.scaled_dot_product_attention``, tanh GELU, LayerNorm eps 1e-6; batches by indexing a random
permutation, ``AdamW``, ``clip_grad_norm_`` for the GPT; 2 threads). Best of ``--repeats`` interleaved
rounds after a warm-up segment; images/s and tokens/s are steps/s x batch (x context):

    ratio_transformer_single: vit = (a) steps/s / (c) steps/s, gpt = likewise
"""

from __future__ import annotations

import argparse
import functools
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
    """A population of k networks (LeNet-300-100 unless ``model`` is given) in the lth engine;
    ``segment()`` times one ``engine.run``."""

    def __init__(self, x, y, k: int, steps: int, rounds: int, engine_mod, knobs: dict,
                 member_batch: int | None = None, model: str = "lenet_300_100", density: float = DENSITY,
                 **train):
        import jax
        import jax.numpy as jnp

        from lth.config import ModelConfig, TrainConfig
        from lth.models import build_model
        from lth.train import init_population

        self.jax, self.k, self.steps = jax, k, steps
        shape = x.shape[1:]
        model = build_model(ModelConfig(name=model), CLASSES, shape)
        ex, ey = np.zeros((0, *shape), np.float32), np.zeros((0,), np.int32)
        data = SimpleNamespace(x_train=x, y_train=y, x_val=ex, y_val=ey, x_test=ex, y_test=ey)
        total = steps * (rounds + 1)
        train = {"optimizer": "adam", "lr": LR, "batch_size": BATCH, **train}
        cfg = TrainConfig(steps=total, eval_every=10 * total, member_batch=member_batch, **train)
        self.engine = engine_mod.Engine(model, data, cfg, **knobs)
        params, bs = init_population(model, jax.random.split(jax.random.key(0), k), shape)
        rng = np.random.default_rng(1)
        masks = jax.tree.map(  # kernels (ndim >= 3 with the population axis) at `density`, biases kept
            lambda p: jnp.asarray(rng.random(p.shape) < density if p.ndim >= 3 else np.ones(p.shape, bool)),
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


# ----------------------------------------------------------------------------- convnet rows

# name -> (lth model, batch, train settings): Frankle & Carbin 2019 Conv-2 (Adam 2e-4, batch 60; and
# batch 128), Frankle et al. 2020 ResNet-20 (SGD 0.1, momentum 0.9, batch 128, batch norm).
CONV_WORKLOADS = {
    "conv2_b60": ("conv2", 60, dict(optimizer="adam", lr=2e-4)),
    "conv2_b128": ("conv2", 128, dict(optimizer="adam", lr=2e-4)),
    "resnet20_b128": ("resnet20", 128, dict(optimizer="sgd", lr=0.1, momentum=0.9)),
    "vgg11_b128": ("vgg11", 128, dict(optimizer="sgd", lr=0.1, momentum=0.9)),
}
CONV_N, CONV_SHAPE, CONV_K = 10_000, (32, 32, 3), 4


def make_images(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((CONV_N, *CONV_SHAPE), dtype=np.float32)
    return x, rng.integers(0, CLASSES, CONV_N).astype(np.int32)


class BareJitRunner:
    """The same Flax model trained by a plain loop over one ``jax.jit`` step (state donated, data
    resident, the batch gathered on the device by indices from a host permutation): what a user
    writes without lth, and the speed an lth segment should reach."""

    def __init__(self, x, y, model_name: str, batch: int, steps: int, train: dict):
        import jax
        import jax.numpy as jnp
        import optax

        from lth.config import ModelConfig
        from lth.models import build_model

        self.jax, self.steps, self.batch, self.n = jax, steps, batch, len(x)
        model = build_model(ModelConfig(name=model_name), CLASSES, x.shape[1:])
        variables = model.init(jax.random.key(0), jnp.zeros((1, *x.shape[1:])), train=False)
        params, bs = variables["params"], variables.get("batch_stats", {})
        tx = (optax.adam(train["lr"]) if train["optimizer"] == "adam"
              else optax.sgd(train["lr"], momentum=train.get("momentum") or None))
        xd, yd = jax.device_put(x), jax.device_put(y)

        @functools.partial(jax.jit, donate_argnums=(0,))
        def step(carry, idx):
            params, bs, opt = carry

            def loss_fn(p):
                if bs:
                    logits, upd = model.apply({"params": p, "batch_stats": bs}, xd[idx], train=True,
                                              mutable=["batch_stats"])
                    new_bs = upd["batch_stats"]
                else:
                    logits, new_bs = model.apply({"params": p}, xd[idx], train=True), bs
                return optax.softmax_cross_entropy_with_integer_labels(logits, yd[idx]).mean(), new_bs

            (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), new_bs, opt), loss

        self.step, self.carry = step, (params, bs, tx.init(params))
        self.rng, self.perm, self.pos = np.random.default_rng(0), None, 0
        t0 = time.perf_counter()
        self.segment()  # compiles the step
        self.first_s = time.perf_counter() - t0

    def _indices(self):
        if self.perm is None or self.pos + self.batch > self.n:
            self.perm, self.pos = self.rng.permutation(self.n).astype(np.int32), 0
        self.pos += self.batch
        return self.perm[self.pos - self.batch:self.pos]

    def segment(self) -> float:
        t0 = time.perf_counter()
        for _ in range(self.steps):
            self.carry, loss = self.step(self.carry, self._indices())
        value = float(loss)
        dt = time.perf_counter() - t0
        if not np.isfinite(value):
            raise RuntimeError("bare jit: non-finite loss")
        return dt


def torch_model(model_name: str):
    """Conv-2, ResNet-20 or VGG-11 in PyTorch, layer for layer as lth.models builds them."""
    import torch.nn as nn

    if model_name == "vgg11":  # conv (no bias)-BN-ReLU, 2x2 max-pools, global average pool, output
        layers, cin = [], 3
        for item in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512):
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
                cin = item
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, CLASSES))

    if model_name == "conv2":
        return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16 * 64, 256), nn.ReLU(),
                             nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, CLASSES))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                      nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return (self.body(x) + self.short(x)).relu()

    layers, cin = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for s, cout in enumerate((16, 32, 64)):
        for b in range(3):
            layers.append(Block(cin, cout, 2 if s > 0 and b == 0 else 1))
            cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, CLASSES))


class TorchConvRunner:
    """The PyTorch loop of the same model: batches by indexing a random permutation (NCHW tensors),
    forward, ``backward()``, optimizer step; 2 threads."""

    def __init__(self, x, y, model_name: str, batch: int, steps: int, train: dict):
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(2)
        torch.manual_seed(0)
        self.torch, self.steps, self.batch = torch, steps, batch
        model = torch_model(model_name)
        opt = (torch.optim.Adam(model.parameters(), lr=train["lr"]) if train["optimizer"] == "adam"
               else torch.optim.SGD(model.parameters(), lr=train["lr"], momentum=train.get("momentum", 0.0)))
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        yt = torch.from_numpy(y).long()
        model.train()

        def train_step(xb, yb):
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            return loss

        def batches():
            while True:
                perm = torch.randperm(len(xt))
                for i in range(len(xt) // batch):
                    j = perm[i * batch:(i + 1) * batch]
                    yield xt[j], yt[j]

        self.train_step, self.batches = train_step, batches()
        t0 = time.perf_counter()
        self.segment()  # warm-up
        self.first_s = time.perf_counter() - t0

    def segment(self) -> float:
        t0 = time.perf_counter()
        for _ in range(self.steps):
            loss = self.train_step(*next(self.batches))
        value = loss.item()
        dt = time.perf_counter() - t0
        if not np.isfinite(value):
            raise RuntimeError("torch: non-finite loss")
        return dt


def conv_rows(steps: int, rounds: int, torch_mod, engine_mod, knobs: dict, mb: int | None) -> None:
    """Every convnet workload: lth one network (the auto segment strategy, and "step" for
    comparison), lth population of CONV_K, bare jitted step, PyTorch; best of ``rounds`` interleaved."""
    from lth.models import conv_path

    x, y = make_images()
    log(f"conv path: {conv_path()}")
    log(f"convnets: CIFAR-shaped random data {CONV_N} x {'x'.join(map(str, CONV_SHAPE))} float32, dense masks, "
        f"{steps} steps per segment ({max(1, steps // 2)} for ResNet-20 and VGG-11), best of {rounds} interleaved rounds "
        f"after a warm-up segment; population K = {CONV_K}")
    ratio_torch, ratio_bare = {}, {}
    for name, (model, batch, train) in CONV_WORKLOADS.items():
        n = conv_steps(model, steps)
        kw = dict(model=model, density=1.0, batch_size=batch, **train)
        runners: dict[str, object] = {}
        runners["lth"] = r = LthRunner(x, y, 1, n, rounds, engine_mod, knobs, mb, **kw)
        log(f"  {name}: lth segment = {r.engine.segment} (auto); compile + first segment {r.first_s:.1f} s")
        other = "step" if r.engine.segment == "scan" else "scan"
        runners[f"lth_{other}"] = LthRunner(x, y, 1, n, rounds, engine_mod, knobs, mb, segment=other, **kw)
        runners["pop"] = LthRunner(x, y, CONV_K, n, rounds, engine_mod, knobs, mb, **kw)
        runners["bare"] = BareJitRunner(x, y, model, batch, n, train)
        if torch_mod is not None:
            runners["torch"] = TorchConvRunner(x, y, model, batch, n, train)
        best = {k: float("inf") for k in runners}
        for _ in range(rounds):
            for k, r in runners.items():
                best[k] = min(best[k], r.segment())
        sps = {k: n / dt for k, dt in best.items()}
        log(f"  {name}: (a) lth single {sps['lth']:7.2f} steps/s | (a') lth segment={other} {sps[f'lth_{other}']:7.2f} "
            f"| (b) lth K={CONV_K} {sps['pop']:6.2f} x {CONV_K} = {sps['pop'] * CONV_K:7.2f} network-steps/s "
            f"| (e) bare jit {sps['bare']:7.2f}"
            + (f" | (c) torch {sps['torch']:7.2f}" if "torch" in sps else "") + " steps/s")
        ratio_bare[name] = sps["lth"] / sps["bare"]
        if "torch" in sps:
            ratio_torch[name] = (sps["lth"] / sps["torch"], sps["pop"] * CONV_K / sps["torch"])
    log("conv_vs_bare_jit: " + "  ".join(f"{k} {v:.2f}" for k, v in ratio_bare.items()))
    if ratio_torch:
        log("ratio_conv_single: " + " ".join(f"{k}={v[0]:.2f}" for k, v in ratio_torch.items()))
        log(f"ratio_conv_population: " + "  ".join(f"{k} {v[1]:.2f}" for k, v in ratio_torch.items())
            + f"  (K={CONV_K} network-steps/s against (c))")


# ----------------------------------------------------------------------------- transformer rows

# name -> (lth model settings, batch, train settings): the wider ViT named in experiments/vit_fmnist.toml
# and the GPT of experiments/gpt_text.toml
TRANSFORMER_WORKLOADS = {
    "vit": (dict(name="vit", patch=4, dim=64, depth=4, heads=4, mlp_ratio=2.0, pool="cls"), 128,
            dict(optimizer="adamw", lr=1e-3, weight_decay=0.05)),
    "gpt": (dict(name="gpt", depth=2, dim=64, heads=4, mlp_ratio=4.0), 32,
            dict(optimizer="adamw", lr=3e-3, weight_decay=0.01, clip_norm=1.0)),
}
VIT_N, VIT_SHAPE, GPT_BYTES, GPT_CONTEXT = 10_000, (28, 28, 1), 200_000, 64


def transformer_data(name: str):
    """What the engine reads: random images (vit) or a random byte stream with its windows (gpt)."""
    rng = np.random.default_rng(0)
    if name == "vit":
        x = rng.standard_normal((VIT_N, *VIT_SHAPE), dtype=np.float32)
        y = rng.integers(0, CLASSES, VIT_N).astype(np.int32)
        ex, ey = np.zeros((0, *VIT_SHAPE), np.float32), np.zeros((0,), np.int32)
        return SimpleNamespace(x_train=x, y_train=y, x_val=ex, y_val=ey, x_test=ex, y_test=ey), CLASSES
    stream = rng.integers(0, 256, GPT_BYTES).astype(np.uint8)
    win = np.lib.stride_tricks.sliding_window_view(stream[:-1], GPT_CONTEXT)
    ex, ey = np.zeros((0, GPT_CONTEXT), np.float32), np.zeros((0, GPT_CONTEXT), np.int32)
    return SimpleNamespace(x_train=win, y_train=win, x_val=ex, y_val=ey, x_test=ex, y_test=ey,
                           train_tokens=stream, context=GPT_CONTEXT), 256


class LthModelRunner:
    """One network of a configured model (``model``: ModelConfig fields) in the lth engine, dense masks;
    ``segment()`` times one ``engine.run`` of ``steps`` steps."""

    def __init__(self, data, classes: int, model: dict, steps: int, rounds: int, engine_mod, knobs: dict,
                 member_batch: int | None = None, **train):
        import jax
        import jax.numpy as jnp

        from lth.config import ModelConfig, TrainConfig
        from lth.models import build_model
        from lth.train import init_population

        self.jax, self.steps, self.k = jax, steps, 1
        shape = np.shape(data.x_train)[1:]
        net = build_model(ModelConfig(**model), classes, shape)
        total = steps * (rounds + 1)
        cfg = TrainConfig(steps=total, eval_every=10 * total, member_batch=member_batch, **train)
        self.engine = engine_mod.Engine(net, data, cfg, **knobs)
        params, bs = init_population(net, jax.random.split(jax.random.key(0), 1), shape)
        masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
        self.state = self.engine.init(params, bs, masks, jax.random.split(jax.random.key(2), 1))
        self.seeds, self.pos = [0], 0
        t0 = time.perf_counter()
        self.segment()  # compiles the segment program
        self.first_s = time.perf_counter() - t0

    segment = LthRunner.segment


def torch_transformer(name: str, model: dict, classes: int):
    """The ViT or GPT of ``model`` in PyTorch, written with torch.nn primitives, shapes as lth.models."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    dim, heads = model["dim"], model["heads"]
    hidden = int(dim * model["mlp_ratio"])
    causal = name == "gpt"

    class Block(nn.Module):  # pre-LN: x + attn(ln(x)), then x + mlp(ln(x))
        def __init__(self):
            super().__init__()
            self.ln_0, self.ln_1 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
            self.fc_in, self.fc_out = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

        def forward(self, x):
            b, t, _ = x.shape
            h = self.ln_0(x)
            q, k, v = (f(h).view(b, t, heads, dim // heads).transpose(1, 2) for f in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(b, t, dim)
            x = x + self.out(a)
            return x + self.fc_out(F.gelu(self.fc_in(self.ln_1(x)), approximate="tanh"))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            p, c = model["patch"], VIT_SHAPE[2]
            tokens = (VIT_SHAPE[0] // p) * (VIT_SHAPE[1] // p) + 1
            self.embed = nn.Linear(p * p * c, dim)
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
            self.blocks = nn.Sequential(*(Block() for _ in range(model["depth"])))
            self.ln_f, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, classes)

        def forward(self, x):  # x [B, H, W, C] as lth feeds it
            b, h, w, c = x.shape
            p = model["patch"]
            x = x.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
            x = torch.cat([self.cls.expand(b, -1, -1), self.embed(x)], 1) + self.pos
            return self.head(self.ln_f(self.blocks(x))[:, 0])

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.pos = nn.Embedding(256, dim), nn.Embedding(GPT_CONTEXT, dim)
            self.blocks = nn.Sequential(*(Block() for _ in range(model["depth"])))
            self.ln_f, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 256)

        def forward(self, x):  # x [B, T] byte ids
            h = self.embed(x) + self.pos(torch.arange(x.shape[1]))
            return self.head(self.ln_f(self.blocks(h)))

    return ViT() if name == "vit" else GPT()


class TorchTransformerRunner:
    """The PyTorch loop of the same transformer: batches by indexing a random permutation, forward,
    ``backward()``, (clipping,) ``AdamW.step()``; 2 threads."""

    def __init__(self, name: str, data, classes: int, model: dict, batch: int, steps: int, train: dict):
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(2)
        torch.manual_seed(0)
        self.torch, self.steps = torch, steps
        net = torch_transformer(name, model, classes)
        opt = torch.optim.AdamW(net.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
        clip = train.get("clip_norm")
        if name == "gpt":
            stream = torch.from_numpy(data.train_tokens.astype(np.int64))
            n = len(stream) - GPT_CONTEXT - 1
            offsets = torch.arange(GPT_CONTEXT)

            def take(j):
                pos = j[:, None] + offsets
                return stream[pos], stream[pos + 1]
        else:
            xt, yt = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train).long()
            n = len(xt)

            def take(j):
                return xt[j], yt[j]
        net.train()

        def train_step(xb, yb):
            opt.zero_grad()
            logits = net(xb)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            return loss

        def batches():
            while True:
                perm = torch.randperm(n)
                for i in range(n // batch):
                    yield take(perm[i * batch:(i + 1) * batch])

        self.train_step, self.batches = train_step, batches()
        t0 = time.perf_counter()
        self.segment()  # warm-up
        self.first_s = time.perf_counter() - t0

    segment = TorchConvRunner.segment


def transformer_rows(steps: int, rounds: int, torch_mod, engine_mod, knobs: dict, mb: int | None) -> None:
    """The vit and gpt rows: lth one network and the PyTorch reference, best of ``rounds`` interleaved."""
    log(f"transformers: {steps} steps per segment, best of {rounds} interleaved rounds after a warm-up segment, "
        "dense masks")
    ratio = {}
    for name, (model, batch, train) in TRANSFORMER_WORKLOADS.items():
        data, classes = transformer_data(name)
        runners: dict[str, object] = {}
        runners["lth"] = r = LthModelRunner(data, classes, model, steps, rounds, engine_mod, knobs, mb,
                                            batch_size=batch, **train)
        log(f"  {name}: lth segment = {r.engine.segment}; compile + first segment {r.first_s:.1f} s")
        if torch_mod is not None:
            runners["torch"] = TorchTransformerRunner(name, data, classes, model, batch, steps, train)
        best = {k: float("inf") for k in runners}
        for _ in range(rounds):
            for k, run in runners.items():
                best[k] = min(best[k], run.segment())
        sps = {k: steps / dt for k, dt in best.items()}
        per = batch * (GPT_CONTEXT if name == "gpt" else 1)
        unit = "tokens/s" if name == "gpt" else "images/s"
        log(f"  {name}: (a) lth single {sps['lth']:7.2f} steps/s = {sps['lth'] * per:9.0f} {unit}"
            + (f" | (c) torch {sps['torch']:7.2f} steps/s = {sps['torch'] * per:9.0f} {unit}" if "torch" in sps
               else ""))
        if "torch" in sps:
            ratio[name] = sps["lth"] / sps["torch"]
    if ratio:
        log("ratio_transformer_single: " + " ".join(f"{k}={v:.2f}" for k, v in ratio.items()))
    else:
        log(f"ratio_transformer_single: skipped ({TORCH_HINT})")


def conv_steps(model: str, steps: int) -> int:
    """Steps per timed segment of a convnet row: half of ``steps`` for the larger ResNet-20 and VGG-11."""
    return steps if model.startswith("conv") else max(1, steps // 2)


def conv_ratio_rows(steps: int, rounds: int, torch_mod, engine_mod, knobs: dict, mb: int | None,
                    only: list[str] | None = None) -> dict[str, float]:
    """The quick ``ratio_conv_single`` line (``--conv-ratio``): per convnet workload only (a) lth, one
    network (the real engine, ``train.segment = auto``), and (c) the PyTorch loop, best of ``rounds``
    interleaved segments after a warm-up segment each. Prints which convolution path lth ran
    (:func:`lth.models.conv_path`). Returns {workload: lth steps/s / torch steps/s}."""
    from lth.models import conv_path

    if torch_mod is None:
        log(f"ratio_conv_single: skipped ({TORCH_HINT})")
        return {}
    x, y = make_images()
    log(f"conv path: {conv_path()}")
    log(f"convnets (ratio only): CIFAR-shaped random data {CONV_N} x {'x'.join(map(str, CONV_SHAPE))} float32, "
        f"dense masks, {steps} steps per segment ({conv_steps('vgg11', steps)} for ResNet-20 and VGG-11), best of "
        f"{rounds} interleaved rounds after a warm-up segment; torch {torch_mod.get_num_threads()} threads")
    ratios = {}
    for name, (model, batch, train) in CONV_WORKLOADS.items():
        if only and name not in only:
            continue
        n = conv_steps(model, steps)
        lth_run = LthRunner(x, y, 1, n, rounds, engine_mod, knobs, mb, model=model, density=1.0, batch_size=batch,
                            **train)
        torch_run = TorchConvRunner(x, y, model, batch, n, train)
        best = [float("inf"), float("inf")]
        for _ in range(rounds):
            best = [min(best[0], lth_run.segment()), min(best[1], torch_run.segment())]
        ratios[name] = best[1] / best[0]
        log(f"  {name}: lth segment = {lth_run.engine.segment}, compile + first segment {lth_run.first_s:.1f} s | "
            f"(a) lth {n / best[0]:6.2f} steps/s | (c) torch {n / best[1]:6.2f} steps/s | ratio {ratios[name]:.2f}")
    log("ratio_conv_single: " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    return ratios


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
    ap.add_argument("--conv", action="store_true",
                    help="also the convnet rows (Conv-2 batch 60 and 128, ResNet-20 batch 128)")
    ap.add_argument("--conv-only", action="store_true", help="only the convnet rows")
    ap.add_argument("--conv-ratio", action="store_true",
                    help="only the quick ratio_conv_single line: lth one network against PyTorch per convnet row")
    ap.add_argument("--conv-rows", default=None,
                    help="with --conv-ratio: comma-separated workloads (default all: " + ",".join(CONV_WORKLOADS) + ")")
    ap.add_argument("--conv-steps", type=int, default=6,
                    help="steps per timed convnet segment (half for ResNet-20; default 6)")
    ap.add_argument("--transformer", action="store_true",
                    help="also the transformer rows (the vit and gpt recipes' models against PyTorch)")
    ap.add_argument("--transformer-only", action="store_true", help="only the transformer rows")
    ap.add_argument("--transformer-steps", type=int, default=20,
                    help="steps per timed transformer segment (default 20)")
    ap.add_argument("--engine", default="lth.train",
                    help="module or .py file providing Engine (default lth.train; for profiling copies)")
    ap.add_argument("--knobs", default="{}", help="JSON keyword arguments for Engine (experimental copies only)")
    ap.add_argument("--cold-start", action="store_true",
                    help="only the cold_vs_warm_main_job figure: the README's main job with an empty, then a warm "
                         "compile cache (benchmarks/cold_start.py)")
    args = ap.parse_args(argv)
    if args.cold_start:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import cold_start
        cold_start.run([])
        return 0
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
    log(f"jax {jax.__version__} on {jax.default_backend()} ({len(jax.devices())} x {jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs, member_batch {args.member_batch}, engine {args.engine}{' ' + json.dumps(knobs) if knobs else ''}")
    torch_mod = None
    if not args.no_torch:
        try:
            import torch as torch_mod
        except ImportError:
            log(f"note: {TORCH_HINT}")
    if torch_mod is not None:
        log(f"torch {torch_mod.__version__}, {torch_mod.get_num_threads()} threads")

    if args.conv_ratio:
        only = [r.strip() for r in args.conv_rows.split(",")] if args.conv_rows else None
        unknown = sorted(set(only or ()) - set(CONV_WORKLOADS))
        if unknown:
            ap.error(f"--conv-rows {args.conv_rows!r}: unknown {', '.join(unknown)}; allowed: {', '.join(CONV_WORKLOADS)}")
        conv_ratio_rows(args.conv_steps, rounds, torch_mod, engine_mod, knobs, mb, only)
        return 0
    if args.conv or args.conv_only:
        conv_rows(args.conv_steps, rounds, torch_mod, engine_mod, knobs, mb)
        if args.conv_only:
            return 0
    if args.transformer or args.transformer_only:
        transformer_rows(args.transformer_steps, rounds, torch_mod, engine_mod, knobs, mb)
        if args.transformer_only:
            return 0

    log(f"workload: LeNet-300-100, batch {BATCH}, Adam lr {LR}, {N_TRAIN} x {DIM} float32 random data, "
        f"kernel masks {DENSITY:.0%} dense; {FLOPS_PER_STEP / 1e6:.1f} MFLOP per network-step (3 x forward)")
    log(f"timing: {steps} steps per segment, best of {rounds} interleaved rounds after an untimed "
        f"warm-up (compile) segment")
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
