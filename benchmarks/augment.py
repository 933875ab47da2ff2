"""Training speed with and without ``data.augment = "crop_flip"``: what the on-device augmentation costs.

Workload: ResNet-20 (``lth.models``, Frankle et al. 2020's CIFAR-10 network) at batch 128, SGD lr 0.1,
momentum 0.9, weight decay 1e-4, dense masks, one network, on ``--n-train`` (default 10,000)
CIFAR-shaped 32 x 32 x 3 standard-normal float32 images with random labels (the shapes are what
matter for speed; the real CIFAR-10 files are not needed). Two ``lth.train.Engine`` objects differ
only in ``augment`` ("none" or "crop_flip"); each timed call is ``Engine.run`` over ``--steps`` steps
with ``evaluate=False`` (one compiled segment, nothing but training and its loss/accuracy), the state
carried on from the previous call.

Timing. Each engine first runs one untimed segment of the timed length (the compile). Then
``--repeats`` rounds each time one segment of both engines, interleaved and alternating which goes
first (none, crop_flip; crop_flip, none; ...), since the machine is shared and its load drifts.
Printed per engine: best and median steps/s over the rounds; and

    ratio_best   = crop_flip best steps/s / none best steps/s
    ratio_median = median over rounds of (crop_flip steps/s / none steps/s in the same round)

``ratio_cpu`` = none's / crop_flip's median CPU seconds per step (``time.process_time`` of this
process over a segment, all its threads): the work each step costs, which the other processes on a
shared machine disturb less than the wall time; and the augmentation alone (``crop_flip`` jitted on one batch, best of 50 calls) as a share of the best
un-augmented step: an upper bound on its cost inside the step that the machine's load disturbs less.

    python benchmarks/augment.py [--model resnet20] [--steps 20] [--repeats 5] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import numpy as np


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20", help="a built-in image model (default resnet20)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="steps per timed segment")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    args = p.parse_args(argv)

    import jax

    from lth.config import ModelConfig, TrainConfig
    from lth.models import build_model
    from lth.train import Engine, init_variables, stack

    rng = np.random.default_rng(0)
    shape = (32, 32, 3)
    x = rng.standard_normal((args.n_train, *shape), dtype=np.float32)
    y = rng.integers(0, 10, args.n_train).astype(np.int32)
    empty = np.zeros((0, *shape), np.float32)
    data = SimpleNamespace(x_train=x, y_train=y, x_val=empty, y_val=y[:0], x_test=empty, y_test=y[:0],
                           num_classes=10, input_shape=shape)
    model = build_model(ModelConfig(name=args.model, init="kaiming_normal"), 10, shape)
    total = args.steps * (args.repeats + 1)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=args.batch,
                      steps=total, eval_every=total)
    params, batch_stats = init_variables(model, jax.random.key(0), shape)
    masks = jax.tree.map(lambda p: np.ones(p.shape, bool), params)

    runs = {}
    for aug in ("none", "crop_flip"):
        engine = Engine(model, data, cfg, augment=aug)
        state = engine.init(stack([params]), stack([batch_stats]), stack([masks]), jax.random.key(0)[None])
        runs[aug] = {"engine": engine, "state": state, "pos": 0, "rates": []}
    print(f"{args.model}, batch {args.batch}, {args.steps} steps per segment, segment strategy "
          f"{runs['none']['engine'].segment}, backend {jax.default_backend()}, {jax.device_count()} device(s)",
          flush=True)

    def segment(aug: str) -> float:
        r = runs[aug]
        t, c = time.perf_counter(), time.process_time()
        out = r["engine"].run(r["state"], [0], start=r["pos"], stop=r["pos"] + args.steps, evaluate=False)
        jax.block_until_ready(out.state.params)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        r["state"], r["pos"] = out.state, r["pos"] + args.steps
        r.setdefault("cpu_s_per_step", []).append(dc / args.steps)
        return args.steps / dt

    for aug in runs:  # compile + warm-up
        t = time.perf_counter()
        segment(aug)
        print(f"warm-up {aug}: {time.perf_counter() - t:.1f} s (includes the compile)", flush=True)
    pair_ratios = []
    for i in range(args.repeats):
        order = ("none", "crop_flip") if i % 2 == 0 else ("crop_flip", "none")
        rates = {aug: segment(aug) for aug in order}
        for aug, v in rates.items():
            runs[aug]["rates"].append(v)
        pair_ratios.append(rates["crop_flip"] / rates["none"])
        print(f"round {i + 1}: none {rates['none']:.2f} steps/s, crop_flip {rates['crop_flip']:.2f} steps/s, "
              f"ratio {pair_ratios[-1]:.3f}", flush=True)
    out = {aug: {"best": max(r["rates"]), "median": float(np.median(r["rates"]))} for aug, r in runs.items()}
    out["ratio_best"] = out["crop_flip"]["best"] / out["none"]["best"]
    out["ratio_median"] = float(np.median(pair_ratios))
    for aug, r in runs.items():  # CPU seconds this process spent per step: less sensitive to others' load
        out[aug]["cpu_s_per_step"] = float(np.median(r["cpu_s_per_step"][1:]))
    out["ratio_cpu"] = out["none"]["cpu_s_per_step"] / out["crop_flip"]["cpu_s_per_step"]
    # the augmentation alone, jitted, on one batch: its share of a step, less exposed to the load
    import jax.numpy as jnp

    from lth.data import augment_key, crop_flip

    aug_fn = jax.jit(lambda k, x: crop_flip(augment_key(k, 7), x))
    xb, key = jnp.asarray(x[:args.batch]), jax.random.key(0)
    jax.block_until_ready(aug_fn(key, xb))
    times = []
    for _ in range(50):
        t = time.perf_counter()
        jax.block_until_ready(aug_fn(key, xb))
        times.append(time.perf_counter() - t)
    out["augment_alone_ms"] = 1e3 * min(times)
    out["augment_share_of_step"] = min(times) * out["none"]["best"]
    for aug in runs:
        print(f"{aug:>9}: best {out[aug]['best']:.2f} steps/s, median {out[aug]['median']:.2f} steps/s")
    print(f"ratio_best = {out['ratio_best']:.3f}, ratio_median = {out['ratio_median']:.3f} (crop_flip / none)")
    print(f"CPU s per step (median of rounds): none {out['none']['cpu_s_per_step']:.3f}, crop_flip "
          f"{out['crop_flip']['cpu_s_per_step']:.3f}; ratio_cpu = {out['ratio_cpu']:.3f} (speed, crop_flip / none)")
    print(f"crop_flip alone (jitted, one batch of {args.batch}, best of 50): {out['augment_alone_ms']:.2f} ms "
          f"= {100 * out['augment_share_of_step']:.2f}% of the best un-augmented step")
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
