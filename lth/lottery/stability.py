"""Linear-mode-connectivity instability (Frankle, Dziugaite, Roy & Carbin 2020).

Two copies of a network that start from the same weights and mask and differ only in SGD noise
(batch order and dropout rng: :func:`~lth.lottery.runner.data_seed`) are trained to the end; the
test error is evaluated at ``points`` evenly spaced points ``(1 - a) w0 + a w1`` of the straight
line between them (a in [0, 1], endpoints included). Instability is the error barrier (their
Eq. 1 with the mean of the endpoints): ``max_a err(a) - (err(0) + err(1)) / 2``. The copies share
their mask, so every point keeps it (a pruned weight is 0 at both ends, hence ``(1-a) 0 + a 0 = 0``;
checked). Batch-norm running statistics of a point are recomputed from ``bn_batches`` training
batches, since averaged statistics do not belong to averaged weights.

Two uses, both stored with a checksummed marker written last (like the quant cells):

- the ``[stability]`` stage: copy 1 of each chosen (arm, seed) trains as an extra member of its
  level (:meth:`~lth.lottery.runner.Lottery.members`); after the level, :class:`StabilityStage`
  evaluates every pair's path in one compiled program (pairs vmapped, points mapped) into
  ``level_NNN/stability/<key>.parquet`` + ``<key>.json``;
- :func:`rewind_stability` (``lth stability``): instability vs rewind step k of one level: the
  level's masks with the dense run's weights at step k (rebuilt from ``init.msgpack``), two copies
  each trained from k to the end, into ``stability_rewind/level_NNN/<key>.parquet`` + ``.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from ..config import ConfigError, ExperimentConfig, StabilityConfig
from ..models import structure_of
from ..prune.masks import density, prunable
from ..store import atomic_write_bytes, atomic_write_json, failpoint, load_tree, marked_file_problem, parquet_bytes
from ..stored import StoredRun
from ..train import (Engine, chunk_split, member_batch_size, population_program, stack, unstack)
from .arms import reinit_weights
from .runner import Member, data_seed, member_rngs, read_members

STABILITY_DIR = "stability"
REWIND_DIR = "stability_rewind"
# one row per (pair, point); instability and loss_barrier repeat on every point of a pair
COLUMNS = ["run_id", "level", "arm", "seed", "density", "rewind_step", "point", "alpha", "test_error", "test_loss",
           "instability", "loss_barrier", "points", "bn_batches", "wall_s"]


# ============================================================================ the path (pure)

def interpolate(a, b, alpha):
    """The point ``(1 - alpha) a + alpha b`` of two pytrees (exactly ``a`` at 0 and ``b`` at 1)."""
    return jax.tree.map(lambda x, y: (1 - alpha) * x + alpha * y, a, b)


def _apply(model, params, batch_stats, x):
    if batch_stats:
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return model.apply({"params": params}, x, train=False)


def test_metrics(model, params, batch_stats, xs, ys, valid):
    """(mean cross-entropy loss, error) of one network over padded chunks ``xs [C, n, ...]``; labels
    ``ys [C, n]``, or ``[C, n, T]`` for a language model (the means are then over every token)."""
    def chunk(carry, inp):
        x, y, v = inp
        logits = _apply(model, params, batch_stats, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        wrong = (jnp.argmax(logits, -1) != y).astype(jnp.float32)
        v = v.reshape(v.shape + (1,) * (loss.ndim - 1))  # an example's validity covers its tokens
        return (carry[0] + jnp.sum(loss * v), carry[1] + jnp.sum(wrong * v)), None

    (loss, wrong), _ = jax.lax.scan(chunk, (jnp.float32(0), jnp.float32(0)), (xs, ys, valid))
    n = jnp.sum(valid) * math.prod(ys.shape[2:])
    return loss / n, wrong / n


def batch_norm_stats(model, params, batch_stats, bn_x):
    """Running statistics recomputed for ``params``: the mean over the batches ``bn_x [nb, b, ...]``
    of each batch's mean and variance (what every BatchNorm of the network sees in training mode).

    A train-mode call returns ``m * S + (1 - m) * batch_stat`` for running statistics S and momentum
    m; calls with S = 0 and S = 1 give m and the batch statistic without knowing the model's m."""
    def update(stats, x):
        _, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return upd["batch_stats"]

    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    ones = jax.tree.map(jnp.ones_like, batch_stats)
    u0 = update(zeros, bn_x[0])
    momentum = jax.tree.map(lambda v, u: v - u, update(ones, bn_x[0]), u0)
    mean_u = jax.tree.map(lambda u: u.mean(0), jax.lax.map(lambda x: update(zeros, x), bn_x))
    return jax.tree.map(lambda u, m: u / (1 - m), mean_u, momentum)


def path_program(model, member_batch: int | None) -> Callable:
    """One compiled program: ``(pa, pb, bsa, bsb, masks [P, ...], alphas [N], xs, ys, valid, bn_x)
    -> (loss [P, N], error [P, N], leaked [P])`` for P pairs of networks (copy 0 ``pa``, copy 1 ``pb``)
    and N points each. ``leaked``: pruned weights that are not exactly zero at some point (must be 0).
    ``bn_x`` ``[nb, b, ...]`` (batch-norm models) or None. Pairs are a population
    (:func:`~lth.train.population_program`); the points of a pair are mapped (vmapped off CPU)."""
    def pair(a, b, bsa, bsb, mask, alphas, xs, ys, valid, bn_x):
        def at(alpha):
            w = interpolate(a, b, alpha)
            leaked = sum(jnp.sum((~m) & (p != 0)) for p, m in zip(jax.tree.leaves(w), jax.tree.leaves(mask)))
            bs = interpolate(bsa, bsb, alpha)
            if bs and bn_x is not None:
                bs = batch_norm_stats(model, w, bs, bn_x)
            loss, err = test_metrics(model, w, bs, xs, ys, valid)
            return loss, err, leaked

        loss, err, leaked = jax.lax.map(at, alphas, batch_size=None if member_batch == 1 else alphas.shape[0])
        return loss, err, jnp.sum(leaked)

    return jax.jit(population_program(pair, (0, 0, 0, 0, 0, None, None, None, None, None), member_batch))


def path_rows(loss: np.ndarray, err: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(instability [P], loss_barrier [P]) of paths ``loss, err [P, N]``: the error barrier
    ``max err - mean(err at both ends)`` and the loss above the chord between the end losses."""
    instability = err.max(1) - (err[:, 0] + err[:, -1]) / 2
    chord = (1 - alphas)[None] * loss[:, :1] + alphas[None] * loss[:, -1:]
    return instability, (loss - chord).max(1)


class PathEvaluator:
    """Evaluates the linear paths of pairs of networks of one model on a data set's test split."""

    def __init__(self, model, data, cfg: ExperimentConfig, points: int, bn_batches: int):
        self.model, self.data, self.points, self.bn_batches = model, data, points, bn_batches
        self.member_batch = member_batch_size(cfg.train)
        self.program = path_program(model, self.member_batch)
        self.test = chunk_split(np.asarray(data.x_test), np.asarray(data.y_test), cfg.train.eval_batch_size)
        self.batch_size = cfg.train.batch_size

    @property
    def alphas(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.points, dtype=np.float32)

    def bn_x(self, batch_stats) -> np.ndarray | None:
        """``bn_batches`` training batches (a fixed random subset of train), for batch-norm models."""
        if not jax.tree.leaves(batch_stats):
            return None
        x = self.data.x_train
        n = min(len(x), self.bn_batches * self.batch_size) // self.batch_size * self.batch_size
        idx = np.sort(np.random.default_rng(0).permutation(len(x))[:n])
        return np.asarray(x[idx]).reshape(n // self.batch_size, self.batch_size, *np.shape(x)[1:])

    def __call__(self, pa, pb, bsa, bsb, masks) -> tuple[np.ndarray, np.ndarray]:
        """(loss, error) ``[P, N]`` along the paths of P pairs; AssertionError if a point leaks the mask."""
        xs, ys, valid = self.test
        bsa, bsb = bsa or {}, bsb or {}
        loss, err, leaked = jax.device_get(self.program(pa, pb, bsa, bsb, masks, self.alphas, xs, ys, valid,
                                                        self.bn_x(bsa)))
        assert not np.any(leaked), f"interpolated points broke the mask ({leaked} pruned weights not 0)"
        return np.asarray(loss, np.float64), np.asarray(err, np.float64)


# ============================================================================ stored results

def result_key(run_id: str, level: int, points: int, bn_batches: int, pairs: Sequence[tuple[str, int]],
               rewind_step: int | None = None) -> str:
    """The id of a stored path result: sha256 of (run id, level, points, bn_batches, the (arm, seed)
    pairs; the rewind step for :func:`rewind_stability`)."""
    d = {"run_id": run_id, "level": int(level), "points": int(points), "bn_batches": int(bn_batches),
         "pairs": sorted([a, int(s)] for a, s in pairs)}
    if rewind_step is not None:
        d["rewind_step"] = int(rewind_step)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def result_problem(folder: Path, key: str) -> str | None:
    """None when the result ``key`` in ``folder`` is complete and intact; else why not."""
    return marked_file_problem(Path(folder) / f"{key}.parquet", Path(folder) / f"{key}.json")


def write_result(folder: Path, key: str, rows: pd.DataFrame) -> None:
    """The table first, then its marker with the checksum (a killed write recomputes)."""
    data = parquet_bytes(rows[COLUMNS].reset_index(drop=True))
    atomic_write_bytes(Path(folder) / f"{key}.parquet", data)
    failpoint(f"stability:{key}")
    atomic_write_json(Path(folder) / f"{key}.json", {"sha256": hashlib.sha256(data).hexdigest()})


def read_results(folder: Path) -> pd.DataFrame:
    """Every intact result in ``folder`` as one table (damaged ones left out)."""
    folder = Path(folder)
    frames = [pd.read_parquet(folder / f"{m.stem}.parquet") for m in sorted(folder.glob("*.json"))
              if result_problem(folder, m.stem) is None] if folder.is_dir() else []
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def stored_pairs(members: Sequence[Member], arms: Iterable[str] | None = None) -> list[tuple[str, int]]:
    """(arm, seed) of every stored copy 1 whose copy 0 is stored too (optionally of ``arms`` only)."""
    have = set(members)
    return [(m.arm, m.seed) for m in members if m.copy == 1 and Member(m.arm, m.seed) in have
            and (arms is None or m.arm in arms)]


def _take(tree, idx):
    return jax.tree.map(lambda a: np.asarray(a)[np.asarray(idx, int)], tree)


def _path_table(run_id, level, pairs, densities, loss, err, alphas, rewind_step, points, bn_batches, wall_s):
    instability, barrier = path_rows(loss, err, alphas)
    rows = []
    for p, (arm, seed) in enumerate(pairs):
        for j, a in enumerate(alphas):
            rows.append({"run_id": run_id, "level": level, "arm": arm, "seed": seed, "density": densities[p],
                         "rewind_step": rewind_step, "point": j, "alpha": float(a), "test_error": err[p, j],
                         "test_loss": loss[p, j], "instability": instability[p], "loss_barrier": barrier[p],
                         "points": points, "bn_batches": bn_batches, "wall_s": wall_s})
    return pd.DataFrame(rows, columns=COLUMNS)


class StabilityStage:
    """The ``[stability]`` stage of one stored run: the path of every stored pair of copies, per level."""

    def __init__(self, run: StoredRun, sc: StabilityConfig | None = None, log: Callable[[str], None] | None = None):
        self.run, self.sc, self.log = run, sc or run.cfg.stability, log
        self._evaluator: PathEvaluator | None = None

    @property
    def evaluator(self) -> PathEvaluator:
        if self._evaluator is None:
            self._evaluator = PathEvaluator(self.run.model, self.run.data, self.run.cfg, self.sc.points,
                                            self.sc.bn_batches)
        return self._evaluator

    def key(self, level: int) -> tuple[str, list[tuple[str, int]]] | None:
        """(result key, pairs) of a complete level, or None when it stores no pair of copies."""
        d = self.run.level_dir(level)
        pairs = stored_pairs(read_members(d), self.sc.arms)
        if not pairs:
            return None
        return result_key(self.run.run_id, level, self.sc.points, self.sc.bn_batches, pairs), pairs

    def pending(self, level: int) -> bool:
        k = self.key(level)
        return k is not None and result_problem(self.run.level_dir(level) / STABILITY_DIR, k[0]) is not None

    def run_level(self, level: int, *, recompute: bool = False) -> pd.DataFrame:
        """The path table of ``level`` (computed and stored unless an intact one exists)."""
        d = self.run.check_level(level)
        k = self.key(level)
        if k is None:
            return pd.DataFrame(columns=COLUMNS)
        key, pairs = k
        folder = d / STABILITY_DIR
        if not recompute and result_problem(folder, key) is None:
            return pd.read_parquet(folder / f"{key}.parquet")
        t0 = time.time()
        members = read_members(d)
        final, masks = load_tree(d / "final.msgpack"), load_tree(d / "masks.msgpack")
        i0 = [members.index(Member(a, s)) for a, s in pairs]
        i1 = [members.index(Member(a, s, 1)) for a, s in pairs]
        masks0 = jax.tree.map(lambda m: m.astype(bool), _take(masks, i0))
        if not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(masks0), jax.tree.leaves(_take(masks, i1)))):
            raise AssertionError(f"level {level}: stability copies do not share their mask")
        bs = final.get("batch_stats", {}) or {}
        loss, err = self.evaluator(_take(final["params"], i0), _take(final["params"], i1), _take(bs, i0),
                                   _take(bs, i1), masks0)
        can_prune = prunable(unstack(final["params"], 0), self.run.cfg.prune, structure_of(self.run.model))
        dens = [density(unstack(masks0, p), can_prune) for p in range(len(pairs))]
        rows = _path_table(self.run.run_id, level, pairs, dens, loss, err, self.evaluator.alphas,
                           self.run.cfg.rewind.step, self.sc.points, self.sc.bn_batches, time.time() - t0)
        write_result(folder, key, rows)
        if self.log is not None:
            inst = rows.drop_duplicates(["arm", "seed"]).groupby("arm")["instability"].mean()
            self.log(f"level {level} stability ({len(pairs)} pairs, {self.sc.points} points): instability "
                     + ", ".join(f"{a} {v:.4f}" for a, v in inst.items()) + f"; {time.time() - t0:.1f} s")
        return rows


def read_stability(level_dir: Path) -> pd.DataFrame:
    """The stored path tables of one level folder (``[stability]`` stage)."""
    return read_results(Path(level_dir) / STABILITY_DIR)


# ============================================================================ instability vs rewind step

def rewind_stability(run_dir: str | Path, level: int, rewind_steps: Sequence[int], *, points: int | None = None,
                     bn_batches: int | None = None, arms: Sequence[str] | None = None,
                     log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Instability vs rewind step of one stored level (``lth stability``).

    For each step k: every chosen (arm, seed) of the level keeps its stored mask and starts from the
    weights at step k of the seed's dense run (rebuilt deterministically from ``init.msgpack``: the
    same batch order and rng as level 0, so at ``rewind.step`` they equal ``rewind.msgpack``;
    ``reinit`` starts from its own fresh init); two copies (data seeds differ) train from k to the
    end of the schedule; their path is evaluated. Each k is stored apart and reused on a rerun.
    ``arms``: default every arm of the run but small_dense (level 0: the dense network, arm ticket).
    """
    run = StoredRun.open(run_dir)
    cfg = run.cfg
    sc = cfg.stability
    points = sc.points if points is None else points
    bn_batches = sc.bn_batches if bn_batches is None else bn_batches
    fields = {f.name: f.metadata for f in dataclasses.fields(StabilityConfig)}
    for flag, name, v in (("--points", "points", points), ("--bn-batches", "bn_batches", bn_batches)):
        if not fields[name]["check"](v):
            raise ConfigError(f"{flag} {v}: expected {fields[name]['allowed']} (stability.{name})")
    d = run.check_level(level)
    engine = Engine(run.model, run.data, cfg.train)
    steps = sorted({int(k) for k in rewind_steps})
    if not steps or steps[0] < 0 or steps[-1] >= engine.num_steps:
        raise ConfigError(f"--rewind-steps {','.join(map(str, rewind_steps))}: expected steps in [0, "
                          f"{engine.num_steps - 1}] (training has {engine.num_steps} steps)")
    members = [m for m in read_members(d) if m.copy == 0]
    have = sorted({m.arm for m in members})
    arms = list(arms) if arms is not None else [a for a in have if a != "small_dense"]
    if set(arms) - set(have):
        raise ConfigError(f"--arms {','.join(arms)}: level {level} has arms {', '.join(have)}")
    seeds = list(cfg.seeds)
    pairs = [(m.arm, m.seed) for m in members if m.arm in arms]
    folder = run.path / REWIND_DIR / f"level_{level:03d}"
    keys = {k: result_key(run.run_id, level, points, bn_batches, pairs, rewind_step=k) for k in steps}
    todo = [k for k in steps if result_problem(folder, keys[k]) is not None]
    frames = [pd.read_parquet(folder / f"{keys[k]}.parquet") for k in steps if k not in todo]
    if todo:
        with run.store.lock():
            frames += _rewind_compute(run, engine, level, todo, pairs, seeds, folder, keys, points, bn_batches, log)
    return pd.concat(frames, ignore_index=True).sort_values(["rewind_step", "arm", "seed", "point"],
                                                            ignore_index=True)


def _rewind_compute(run, engine, level, steps, pairs, seeds, folder, keys, points, bn_batches, log):
    cfg = run.cfg
    d = run.level_dir(level)
    stored = read_members(d)
    masks = load_tree(d / "masks.msgpack")
    seeds = [s for s in seeds if any(s == seed for _, seed in pairs)]  # only the seeds with a pair
    init = run.weights_file("init.msgpack", seeds)  # stacked in ``seeds`` order, by the file's own record
    dense = [Member("ticket", s) for s in seeds]
    ones = jax.tree.map(lambda p: np.ones(np.shape(p), bool), init["params"])
    # the dense run of every seed to the last k, as level 0 trained it (same rng and batch order); the
    # stored rewind point when it is the only k > 0 asked for
    snaps = {0: init}
    late = [k for k in steps if k > 0]
    if late == [cfg.rewind.step] and run.store.has("rewind.msgpack"):
        snaps[late[0]] = run.weights_file("rewind.msgpack", seeds)
    elif late:
        t0 = time.time()
        state = engine.init(init["params"], init["batch_stats"], ones, member_rngs(dense, 0))
        res = engine.run(state, [data_seed(m) for m in dense], stop=steps[-1], snapshot_steps=steps, evaluate=False)
        snaps.update(res.snapshots)
        if log is not None:
            log(f"dense run rebuilt to step {steps[-1]}: {time.time() - t0:.1f} s")
    evaluator = PathEvaluator(run.model, run.data, cfg, points, bn_batches)
    can_prune = prunable(unstack(init["params"], 0), cfg.prune, structure_of(run.model))
    frames = []
    for k in steps:
        t0 = time.time()
        members = [Member(a, s, c) for a, s in pairs for c in (0, 1)]
        weights, mks = [], []
        for m in members:
            w = unstack(snaps[k], seeds.index(m.seed))
            if m.arm == "reinit" and level > 0:
                w = reinit_weights(run.model, m.seed, level, run.data.input_shape)
            weights.append({"params": w["params"], "batch_stats": w.get("batch_stats", {}) or {}})
            mks.append(jax.tree.map(lambda a: a.astype(bool), unstack(masks, stored.index(Member(m.arm, m.seed)))))
        state = engine.init(stack([w["params"] for w in weights]), stack([w["batch_stats"] for w in weights]),
                            stack(mks), member_rngs(members, level), start=k)
        res = engine.run(state, [data_seed(m) for m in members], start=k, evaluate=False)
        params = jax.device_get(res.state.params)
        bs = jax.device_get(res.state.batch_stats)
        i0, i1 = list(range(0, len(members), 2)), list(range(1, len(members), 2))
        mask0 = _take(stack(mks), i0)
        loss, err = evaluator(_take(params, i0), _take(params, i1), _take(bs, i0), _take(bs, i1), mask0)
        dens = [density(mks[i], can_prune) for i in i0]
        rows = _path_table(run.run_id, level, pairs, dens, loss, err, evaluator.alphas, k, points, bn_batches,
                           time.time() - t0)
        write_result(folder, keys[k], rows)
        frames.append(rows)
        if log is not None:
            inst = rows.drop_duplicates(["arm", "seed"]).groupby("arm")["instability"].mean()
            log(f"level {level} rewind step {k}: instability " + ", ".join(f"{a} {v:.4f}" for a, v in inst.items())
                + f"; {time.time() - t0:.1f} s")
    return frames
