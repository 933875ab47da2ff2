"""One convnet train step of lth's model (a bare jitted step: value_and_grad + optax update, batch norm
statistics updated) against the same step in PyTorch, timed by the process CPU clock; optionally the
per-op time of lth's step from a jax profiler trace (XLA's fusions, with the jax op that made each).

Least disturbed by other load when run on one pinned core with one thread everywhere:

    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false JAX_NUM_CPU_DEVICES=1 \\
        taskset -c 0 python benchmarks/conv_step.py --model resnet20 --batch 128 --torch [--profile]

From a git worktree, put it first: ``PYTHONPATH=$PWD``. Prints steps/s (and CPU seconds per step);
``--wall`` times by the wall clock instead (with ``--torch-threads`` for PyTorch).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import numpy as np


def lth_step(model_name: str, batch: int):
    import jax
    import jax.numpy as jnp
    import optax

    from lth.config import ModelConfig
    from lth.models import build_model

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, batch))
    model = build_model(ModelConfig(name=model_name), 10, (32, 32, 3))
    variables = model.init(jax.random.key(0), x[:1], train=False)
    params, bs = variables["params"], variables.get("batch_stats", {})
    tx = optax.adam(2e-4) if model_name.startswith("conv") else optax.sgd(0.1, momentum=0.9)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(carry):
        p, bs, opt = carry

        def loss_fn(p):
            if bs:
                logits, upd = model.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]
            logits = model.apply({"params": p}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), bs

        (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), new_bs, opt), loss

    return step, (params, bs, tx.init(params)), x, y


def best_seconds(run, steps: int, reps: int, clock) -> float:
    run()
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        for _ in range(steps):
            run()
        best = min(best, (clock() - t0) / steps)
    return best


def profile(step, carry, steps: int = 3, top: int = 30):
    """Per-op milliseconds per step of lth's step, summed by (XLA op kind, jax op name)."""
    import jax

    for _ in range(2):
        carry, loss = step(carry)
    loss.block_until_ready()
    hlo = step.lower(carry).compile().as_text()
    meta = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ .*?op_name=\"([^\"]*)\"", line)
        if m:
            meta[m.group(1)] = re.sub(r"stage\d_block\d/|jit\(step\)/", "", m.group(2))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(steps):
            carry, loss = step(carry)
        loss.block_until_ready()
        jax.profiler.stop_trace()
        events = json.load(gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in meta:
            key = re.sub(r"\.\d+$", "", e["name"]) + " | " + meta[e["name"]]
            total[key] += e.get("dur", 0) / 1e3 / steps
            count[key] += 1
    print(f"profile: {sum(total.values()):.1f} ms per step in XLA ops; top {top}:")
    for key, ms in total.most_common(top):
        print(f"  {ms:8.2f} ms  x{count[key] // steps:4d}  {key[:140]}")


def torch_step(model_name: str, x, y, threads: int):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from throughput import torch_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch_model(model_name)
    opt = (torch.optim.Adam(model.parameters(), lr=2e-4) if model_name.startswith("conv")
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    xt = torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(np.array(y)).long()

    def run():
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        opt.step()

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20", help="conv2, resnet20 or vgg11 (default resnet20)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed repeat (default 3)")
    ap.add_argument("--reps", type=int, default=3, help="timed repeats, the best is kept (default 3)")
    ap.add_argument("--torch", action="store_true", help="also the PyTorch step")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--wall", action="store_true", help="wall clock instead of the process CPU clock")
    ap.add_argument("--profile", action="store_true", help="per-op time of lth's step (jax profiler)")
    args = ap.parse_args(argv)
    clock = time.perf_counter if args.wall else time.process_time

    from lth.models import conv_path

    print(f"conv path: {conv_path()}")
    step, carry, x, y = lth_step(args.model, args.batch)
    state = {"carry": carry}

    def run_lth():
        state["carry"], loss = step(state["carry"])
        loss.block_until_ready()

    t0 = time.perf_counter()
    run_lth()
    print(f"lth {args.model} b{args.batch}: compile + first step {time.perf_counter() - t0:.1f} s (wall)")
    s = best_seconds(run_lth, args.steps, args.reps, clock)
    print(f"lth {args.model} b{args.batch}: {1 / s:.3f} steps/s ({s:.3f} s per step, {'wall' if args.wall else 'CPU'})")
    if args.torch:
        s = best_seconds(torch_step(args.model, x, y, args.torch_threads), args.steps, args.reps, clock)
        print(f"torch {args.model} b{args.batch}: {1 / s:.3f} steps/s ({s:.3f} s per step, "
              f"{args.torch_threads} threads)")
    if args.profile:
        profile(step, state["carry"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
