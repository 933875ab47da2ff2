"""A/B timing of engine variants (benchmarks/_engine_experiment.py knobs) in one process.

The machine is shared and noisy, so variants are timed in interleaved rounds (every round times one
segment of every variant) and the best segment of each is kept. After the rounds every variant has
trained the same steps on the same batches from the same start, so the final weights are compared
with the first variant's (max |difference|): exact variants print 0.

    python benchmarks/_ab.py --k 8 --steps 200 --rounds 5 \
        base '{}' noynn '{"compiler_options": {"xla_cpu_experimental_ynn_fusion_type": ""}}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import throughput as T  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engine", default=str(Path(__file__).parent / "_engine_experiment.py"))
    ap.add_argument("pairs", nargs="+", help="name json-knobs name json-knobs ...")
    a = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from lth.config import ModelConfig, TrainConfig
    from lth.models import build_model
    from lth.train import init_population

    mod = T.load_engine_module(a.engine)
    variants = [(a.pairs[i], json.loads(a.pairs[i + 1])) for i in range(0, len(a.pairs), 2)]
    x, y = T.make_data()
    model = build_model(ModelConfig(name="lenet_300_100"), T.CLASSES, (T.DIM,))
    ex, ey = np.zeros((0, T.DIM), np.float32), np.zeros((0,), np.int32)
    data = SimpleNamespace(x_train=x, y_train=y, x_val=ex, y_val=ey, x_test=ex, y_test=ey)
    total = a.steps * (a.rounds + 1)
    cfg = TrainConfig(optimizer="adam", lr=T.LR, batch_size=T.BATCH, steps=total, eval_every=10 * total)
    k = a.k
    params, bs = init_population(model, jax.random.split(jax.random.key(0), k), (T.DIM,))
    rng = np.random.default_rng(1)
    masks = jax.tree.map(
        lambda p: jnp.asarray(rng.random(p.shape) < T.DENSITY if p.ndim >= 3 else np.ones(p.shape, bool)), params)
    seeds = list(range(k))
    engines, states, best, times, cpu = {}, {}, {}, {}, {}
    for name, knobs in variants:
        t0 = time.perf_counter()
        eng = mod.Engine(model, data, cfg, **knobs)
        st = eng.init(jax.tree.map(jnp.array, params), bs, masks, jax.random.split(jax.random.key(2), k))
        st = jax.block_until_ready(eng.run(st, seeds, start=0, stop=a.steps).state)
        engines[name], states[name], best[name], times[name], cpu[name] = eng, st, float("inf"), [], []
        print(f"{name}: compiled + first segment {time.perf_counter() - t0:.1f} s", flush=True)
    for r in range(1, a.rounds + 1):
        for name, _ in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            res = engines[name].run(states[name], seeds, start=r * a.steps, stop=(r + 1) * a.steps)
            states[name] = jax.block_until_ready(res.state)
            dt = time.perf_counter() - t0
            cpu[name].append((time.process_time() - c0) / a.steps * 1e3)
            times[name].append(a.steps / dt)
            best[name] = min(best[name], dt)
    base = variants[0][0]
    ref = jax.device_get(states[base].params)
    print(f"K={k}, {a.steps} steps x {a.rounds} rounds (interleaved), best segment:")
    for name, knobs in variants:
        p = jax.device_get(states[name].params)
        diff = max(float(np.max(np.abs(u - v))) for u, v in zip(jax.tree.leaves(ref), jax.tree.leaves(p)))
        sps = a.steps / best[name]
        print(f"  {name:14s} {sps:8.1f} steps/s  x{sps / (a.steps / best[base]):5.2f}  "
              f"median {np.median(times[name]):8.1f}  cpu {min(cpu[name]):6.2f} ms/step  max|dW| vs {base} {diff:.2e}  {json.dumps(knobs)}", flush=True)


if __name__ == "__main__":
    main()
