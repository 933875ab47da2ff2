"""Iterative magnitude pruning with rewinding, controls and a resumable store.

Level 0 trains the dense network of every seed (one population). Level L >= 1 prunes a fraction of
each ticket's remaining weights by magnitude (from level L-1's final weights), rewinds the survivors
and trains every arm x seed of the level as one population:

- ``ticket``: the IMP mask with the rewind-point weights (Frankle & Carbin 2019);
- ``reinit``: the same mask with a fresh init from another key;
- ``random_prune``: a random mask with the ticket's exact per-layer counts, rewind-point weights;
- ``shuffle``: the ticket's mask permuted within each layer, rewind-point weights;
- ``snip``, ``grasp``, ``synflow`` and their ``*_shuffle``: pruning at initialization at the ticket's
  per-layer counts (:mod:`lth.lottery.arms`).

The dense level also records the early-bird mask distances (:mod:`lth.lottery.earlybird`).

With ``[stability]``, chosen (arm, seed) of a level also train a second copy (``Member.copy = 1``: the
same start, another batch order and dropout rng) in the same population; the pipeline then evaluates
the path between the copies (:mod:`lth.lottery.stability`). Members are found by value, never by
position.

Each level depends only on stored files, so a rerun resumes at the first incomplete level and ends
with results identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import io
import dataclasses
import functools
import json
import warnings
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from .. import __version__
from ..config import DST_ARMS, ONESHOT_FT_ARMS, ConfigError, ExperimentConfig, check_against_model
from ..data import load_dataset
from ..models import build_model, check_output_width, structure_of
from ..prune.baselines import count_at_width, match_width, narrow_init, pad_params, pads_exactly, unpad_params
from ..prune.criteria import Signals, magnitude_scores
from ..prune.dst import MODES, make_mask_update, update_steps
from ..prune.criteria import scores as criterion_scores
from ..prune.masks import density, layer_table, prunable, prune_by_score, prune_to_density, sparsity_rows
from ..prune.schedules import agp_density, oneshot_config
from ..prune.signals import activation_sparsity
from ..prune.structured import check_granularity, structured_prune
from ..store import (RunStore, StoreError, concat_stacked, load_tree, parquet_bytes, prepare_root, read_json, read_members_file,
                     read_parquet, read_sums, stacked_seeds, take_seeds, tree_bytes, with_seeds)
from ..train import Engine, TrainResult, early_stop_steps, eval_steps, final_lr, init_population, init_variables, stack, unstack
from ..train import is_language_model, lm_metrics
from ..trees import kept_count, seed_keys, to_device, to_numpy
from ..wandb_log import WandbSink, flatten
from .arms import ARMS, ONESHOT_ARMS, ArmStart, prepare_oneshot
from .copies import copy_arms
from .earlybird import EarlyBird, epoch_ends
from .earlybird import applies as earlybird_applies
from .oneshot import check_finetune_lr, evaluate_records, finetune_engine, merge, parts

@dataclass(frozen=True)
class Member:
    """One network of a level's population, identified by value (never by its position).

    ``copy`` > 0: a stability copy of (arm, seed) (:mod:`lth.lottery.stability`): the same start
    weights and mask as copy 0, another batch order and dropout rng (:func:`data_seed`)."""
    arm: str
    seed: int
    copy: int = 0

    def to_json(self) -> dict:
        """Its ``members.json`` entry; ``copy`` only when nonzero (older stores stay readable)."""
        return {"arm": self.arm, "seed": self.seed, **({"copy": self.copy} if self.copy else {})}

    @classmethod
    def from_json(cls, d: dict) -> "Member":
        return cls(str(d["arm"]), int(d["seed"]), int(d.get("copy", 0)))


# Offsets that give a stability copy its own SGD noise (values fixed: results depend on them). The
# batch order of a data seed s is permutation(n, rng=[s, epoch]): seeds are < 2**32, so
# s + c * 2**32 never repeats another seed's order.
COPY_DATA_SEED = 2**32
COPY_RNG = 7_000_003


def data_seed(m: Member) -> int:
    """The data seed (batch order, and augmentation keyed by it) of member ``m``: its seed for copy 0."""
    return m.seed + m.copy * COPY_DATA_SEED


def member_rngs(members, level: int) -> jax.Array:
    """Per member the train-step rng (dropout) ``[K]``: key(seed) folded with the level, and for a
    copy c > 0 then with ``COPY_RNG + c``."""
    if not any(m.copy for m in members):
        return seed_keys([m.seed for m in members], fold=level)

    def one(m: Member) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(m.seed), level)
        return jax.random.fold_in(key, COPY_RNG + m.copy) if m.copy else key

    return jnp.stack([one(m) for m in members])


MEMBERS_FILE = "members.json"  # the level's main population, in stored order
SMALL_DENSE_FILE = "small_dense.json"  # the small-dense members, in small_dense_final.msgpack's order
# present when the level's small-dense members trained padded to full width (Lottery._train_small_dense);
# absent in levels stored before, whose small-dense members trained at their own width
SMALL_DENSE_PADDED_FILE = "small_dense_padded.json"


def read_members(level_dir) -> list[Member]:
    """The members of a stored level's main population, in stored order (``members.json``)."""
    return [Member.from_json(d) for d in read_members_file(Path(level_dir) / MEMBERS_FILE)]


def members_bytes(members) -> bytes:
    return json.dumps([m.to_json() for m in members]).encode()


def stored_members(level_dir: Path) -> tuple[list[Member], list[Member]]:
    """(main population, small-dense members) a complete level folder holds, in stored order."""
    main = read_members(level_dir)
    if (level_dir / SMALL_DENSE_FILE).is_file():
        small = [Member.from_json(r) for r in read_members_file(level_dir / SMALL_DENSE_FILE)]
    elif (level_dir / "small_dense_final.msgpack").is_file():  # written before small_dense.json
        m = read_parquet(level_dir / "metrics.parquet")
        rows = m[m["arm"] == "small_dense"].drop_duplicates("seed").sort_values("member")
        small = [Member("small_dense", int(x)) for x in rows["seed"]]
    else:
        small = []
    return main, small


def wanted_members(cfg: ExperimentConfig, level: int) -> tuple[list[Member], list[Member]]:
    """(main population, small-dense members) of a level under ``cfg`` (its arms x seeds)."""
    if level == 0:
        base, small = [Member("ticket", s) for s in cfg.seeds], []
    else:
        base = [Member(a, s) for a in cfg.arms if a != "small_dense" for s in cfg.seeds]
        small = [Member("small_dense", s) for s in cfg.seeds] if "small_dense" in cfg.arms else []
    arms = copy_arms(cfg, level)  # the stability copies of the chosen (arm, seed), after every copy 0
    return base + [Member(m.arm, m.seed, 1) for m in base if m.arm in arms], small


def missing_members(store: RunStore, cfg: ExperimentConfig, level: int) -> tuple[list[Member], list[Member]]:
    """(main, small-dense) members of ``level`` that ``cfg`` wants and the store does not hold yet:
    all of them when the level is not complete; reads members files only (no data, no compiling)."""
    main, small = wanted_members(cfg, level)
    if not store.is_complete(level):
        return main, small
    have_main, have_small = stored_members(store.level_dir(level))
    return [m for m in main if m not in have_main], [m for m in small if m not in have_small]


def run_is_finished(store: RunStore, cfg: ExperimentConfig) -> bool:
    """Every wanted member of every wanted level is stored (``cfg`` may ask for fewer than the store holds)."""
    return store.path.is_dir() and all(not any(missing_members(store, cfg, level))
                                       for level in range(cfg.prune.levels + 1))


def _hparams_seeds(store: RunStore) -> list[int]:
    path = store.path / "hparams.json"
    return list(read_json(path).get("seeds", [])) if path.is_file() else []


def read_stacked(store: RunStore, name: str) -> tuple[dict, list[int]]:
    """A verified run-level weights file stacked over seeds: (weights, the seed of each entry)."""
    return stacked_seeds(store.read_tree(name), _hparams_seeds(store), str(store.path / name))


def extend_stacked(store: RunStore, name: str, tree: dict, seeds) -> None:
    """Add the entries of ``seeds`` (stacked in ``tree``) to a run-level weights file; entries it holds
    already are kept bit for bit (and those of ``seeds`` it has are not written again)."""
    seeds = [int(s) for s in seeds]
    if store.has(name) and store.file_problem(name) is None:
        old, held = read_stacked(store, name)
        new = [s for s in seeds if s not in held]
        if not new:
            return
        tree = concat_stacked(old, take_seeds(tree, seeds, new))
        seeds = held + new
    store.write_tree(name, with_seeds(tree, seeds))


def stored_init(store: RunStore, model, seeds, input_shape) -> dict:
    """The run's initial weights ``{'params', 'batch_stats'}`` stacked over ``seeds`` (key(seed) each),
    read from ``init.msgpack``; the init of a seed it lacks (a new run, a run that grows) is computed
    and added first. The init is a pure function of the seed, so a damaged file is recomputed."""
    seeds = [int(s) for s in seeds]
    problem = store.file_problem("init.msgpack")
    if problem is not None:  # missing or damaged: the init is a function of the seeds, so recompute it
        if store.has("init.msgpack"):
            print(f"lth: {problem}; recomputing it from the seeds", file=sys.stderr)
        params, bs = init_population(model, seed_keys(seeds), input_shape)
        store.write_tree("init.msgpack", with_seeds({"params": to_numpy(params), "batch_stats": to_numpy(bs)},
                                                    seeds))
    else:
        _, held = read_stacked(store, "init.msgpack")
        new = [s for s in seeds if s not in held]
        if new:  # a run that grows by seeds: their init is added, the stored entries stay as they are
            params, bs = init_population(model, seed_keys(new), input_shape)
            extend_stacked(store, "init.msgpack", {"params": to_numpy(params), "batch_stats": to_numpy(bs)}, new)
    tree, held = read_stacked(store, "init.msgpack")
    return take_seeds(tree, held, seeds, str(store.path / "init.msgpack"))


@dataclass
class LevelPlan:
    members: list[Member]
    weights: list[dict]  # per member {'params', 'batch_stats'} it starts from (before masking)
    masks: list[Any]  # per member bool mask tree
    can_prune: Any  # per leaf: prunable
    start: int  # global step the level's training starts at
    engine: Engine


def population_key(cfg: ExperimentConfig) -> str | None:
    """Runs with equal keys can train each level together as one population; None: the run trains alone.

    Such runs share the data set, model, training and rewinding (so one compiled engine, one start
    step and one batch order per seed); they may differ in seeds, arms, the number of levels and
    in how they prune (rate, scope, criterion, granularity, ...). AGP (``prune.schedule = 'gradual'``)
    updates masks during training and always trains alone.
    """
    if cfg.prune.schedule == "gradual" or set(cfg.arms) & set(DST_ARMS):  # masks move in training: alone
        return None
    d = cfg.to_dict()
    for key in ("name", "seeds", "arms", "log", "quant", "stability", "prune"):
        d.pop(key, None)
    if set(cfg.arms) & set(ONESHOT_FT_ARMS):  # the *_ft arms' engine is the group's
        d["oneshot_finetune"] = [cfg.prune.oneshot_finetune_steps, cfg.prune.oneshot_finetune_lr]
    return json.dumps(d, sort_keys=True)


def grown_settings(old: dict, new: dict) -> dict:
    """The settings dict ``new`` with the seeds, arms and levels of ``old`` (a stored hparams.json of
    the same run) kept: stored seeds and arms first, then ``new``'s others; the most levels."""
    out = dict(new)
    out["seeds"] = list(old.get("seeds", [])) + [s for s in new["seeds"] if s not in old.get("seeds", [])]
    arms = list(old.get("arms", []))
    out["arms"] = arms + [a for a in new["arms"] if a not in arms]
    levels = max(int(old.get("prune", {}).get("levels", 0)), int(new["prune"]["levels"]))
    out["prune"] = {**new["prune"], "levels": levels}
    return out


class Lottery:
    """Runs (and resumes) one IMP experiment into ``out/<run_id>``."""

    def __init__(self, cfg: ExperimentConfig, out: str | Path, *, progress: bool | None = None,
                 share: "Lottery | None" = None):
        """``share``: a Lottery of the same population group (:func:`population_key`) whose data set,
        model and compiled engines this one reuses."""
        self.cfg = cfg
        self.store = RunStore(prepare_root(out), cfg.run_id)
        self.progress = cfg.log.progress if progress is None else progress
        self._share = share
        if share is not None:
            if population_key(share.cfg) != population_key(cfg):
                raise ValueError(f"runs {share.cfg.run_id} and {cfg.run_id} cannot share a population")
            self.data, self.model, self.engine = share.data, share.model, share.engine
        else:
            self.data = load_dataset(cfg.data)
            try:
                self.model = build_model(cfg.model, self.data.num_classes, self.data.input_shape)
                check_output_width(self.model, self.data.num_classes, self.data.input_shape)
                self.engine = Engine(self.model, self.data, cfg.train)
            except ValueError as e:  # model/data mismatch, batch larger than the data set
                raise ConfigError(f"{cfg.model.name} on {cfg.data.name}: {e}") from None
        self._finetune_engine: Engine | None = None
        self._dst_engines: dict[bool, Engine] = {}  # finetune? -> the engine with the set/rigl mask update
        self._oneshot_engine: Engine | None = None  # the *_ft one-shot arms' (lth.lottery.oneshot)
        pc = cfg.prune
        if pc.schedule in ("oneshot", "gradual") and pc.levels > 1:
            raise ConfigError(f"prune.schedule = {pc.schedule!r} prunes in one level: set prune.levels = 1 "
                              f"(got {pc.levels})")
        if pc.schedule == "gradual":
            end = pc.agp_start_step + pc.agp_updates * pc.agp_frequency
            if end > self.engine.num_steps:
                raise ConfigError(f"prune.agp_start_step + agp_updates * agp_frequency = {end} is past the "
                                  f"end of training ({self.engine.num_steps} steps)")
        shapes = jax.eval_shape(lambda k: init_variables(self.model, k, self.data.input_shape)[0], jax.random.key(0))
        self.structure = structure_of(self.model)  # what the model declares: output, frozen, chain, blocks
        check_against_model(cfg, layer_table(shapes, self.structure), self.engine.num_steps,  # before any level trains
                            tuple(k for _, k in self.structure.kinds))
        check_granularity(cfg.prune, self.model, shapes, cfg.model.name)
        self._check_oneshot(shapes)
        check_finetune_lr(cfg, len(self.data.x_train))
        self.trained_levels: list[int] = []  # levels trained by this process (not resumed)
        self.sink: WandbSink | None = None  # set by open_sink

    def _check_oneshot(self, shapes) -> None:
        """ConfigError before any work when a calibrated one-shot arm (wanda, sparsegpt) meets a prunable
        layer it cannot handle yet (embeddings, grouped convs: only Dense and plain 2-D Conv layers)."""
        from ..prune.oneshot_net import unsupported_layers

        calibrated = [a for a in self.cfg.arms if a.removesuffix("_ft") in ("wanda", "sparsegpt")]
        if not calibrated:
            return
        can_prune = prunable(shapes, self.cfg.prune, self.structure)
        bs = jax.eval_shape(lambda k: init_variables(self.model, k, self.data.input_shape)[1], jax.random.key(0))
        x = jax.ShapeDtypeStruct((1, *self.data.input_shape), jnp.float32)
        bad = unsupported_layers(self.model, shapes, bs, x, can_prune)
        if bad:
            raise ConfigError(f"arms {calibrated} on {self.cfg.model.name}: one-shot pruning with calibration supports "
                              f"Dense and plain 2-D Conv layers only, not yet: {', '.join(bad)}; use "
                              f"oneshot_magnitude, or exclude them (prune.exclude)")

    # ------------------------------------------------------------------ fixed weights
    def hparams(self) -> dict:
        """The run's identity file: every setting but the quant stage's (keyed apart, per cell).

        ``seeds``, ``arms`` and ``prune.levels`` (not part of the run id) are those of every config
        the run was grown with: the stored ones first, then this config's new ones (the union; the
        most levels). So the file says what the store holds once this run is done.
        """
        d = self.cfg.to_dict()
        d.pop("quant", None)
        d.pop("stability", None)
        path = self.store.path / "hparams.json"
        if path.is_file():
            old = read_json(path)
            if isinstance(old, dict):
                d = grown_settings(old, d)
        return {**d, "run_id": self.cfg.run_id, "lth_version": __version__,
                "num_steps": self.engine.num_steps, "data_fingerprint": self.data.fingerprint}

    def init_weights(self) -> dict:
        """{'params', 'batch_stats'} stacked over ``cfg.seeds``; created once and stored (a new seed's
        init is added to the file)."""
        return stored_init(self.store, self.model, self.cfg.seeds, self.data.input_shape)

    # ------------------------------------------------------------------ levels
    def members(self, level: int) -> list[Member]:
        """The members of a level's main population that this config wants (small-dense baselines
        train separately)."""
        return wanted_members(self.cfg, level)[0]

    def missing(self, level: int) -> tuple[list[Member], list[Member]]:
        """(main, small-dense) members of ``level`` still to train (all of them for a new level)."""
        return missing_members(self.store, self.cfg, level)

    def needs(self, level: int) -> bool:
        return any(self.missing(level))

    def run(self, log: WandbSink | None = None, after_level: Callable[[int], None] | None = None) -> RunStore:
        """Train every incomplete level, holding the run's lock (RunBusyError if another process has it).

        ``after_level(level)`` is called once each level is complete (trained now or before), in
        level order, still under the lock: the later stages of the pipeline (quantization) hook in here.
        """
        cfg, store = self.cfg, self.store
        with store.lock():
            self.check_rewind_file()
            store.write_hparams(self.hparams())
            init = self.init_weights()
            for level in range(cfg.prune.levels + 1):
                if self.needs(level):  # a new level, or one that grows by seeds or arms
                    self.train_level(level, init, log)
                if after_level is not None:
                    after_level(level)
        return store

    def check_rewind_file(self) -> None:
        """StoreError before any work when ``rewind.msgpack`` is damaged (its checksum in MANIFEST.json)
        or missing while the dense level that wrote it is stored: the rewind points of the stored
        seeds (step k of their dense training) cannot be recomputed without retraining that level,
        and a grow would rewrite the file with the new seeds' points only."""
        store = self.store
        if self.cfg.rewind.step == 0 or not store.is_complete(0):
            return  # no rewind file, or no stored dense level: training it (re)writes the file
        problem = store.file_problem("rewind.msgpack")
        if problem is not None:
            raise StoreError(f"{problem}: the stored seeds' rewind points cannot be recomputed alone; restore "
                             f"the file, or delete {store.level_dir(0)} so that the dense level retrains them")

    def _rewind_point(self, init: dict, seeds: list[int]) -> dict:
        """The rewind-point weights of ``seeds`` (stacked in that order)."""
        if self.cfg.rewind.step == 0:
            return take_seeds(init, list(self.cfg.seeds), seeds)
        tree, held = read_stacked(self.store, "rewind.msgpack")
        return take_seeds(tree, held, seeds, str(self.store.path / "rewind.msgpack"))

    def prepare_level(self, level: int, init: dict, members: list[Member] | None = None) -> "LevelPlan":
        """``members`` of a level (default: every member this config wants; a rerun passes those the
        store lacks, :meth:`missing`), their starting weights and masks, the start step and the engine.

        Level L >= 1 prunes each seed's ticket from level L-1's stored final weights and mask (its
        stored ``ticket`` member of that seed, wherever it sits in the stored population).
        """
        cfg, store = self.cfg, self.store
        members = self.members(level) if members is None else list(members)
        all_seeds = list(cfg.seeds)
        seeds = [s for s in all_seeds if any(m.seed == s for m in members)]  # those with a member to train
        can_prune = prunable(unstack(init["params"], 0), cfg.prune, self.structure)
        if level == 0 or cfg.prune.schedule == "gradual":  # AGP: train from init, masks follow the schedule
            weights = [unstack(init, all_seeds.index(m.seed)) for m in members]
            masks = [jax.tree.map(lambda p: np.ones(p.shape, bool), w["params"]) for w in weights]
            return LevelPlan(members, weights, masks, can_prune, 0, self.engine)
        prev = store.level_dir(level - 1)
        prev_members = stored_members(prev)[0]
        prev_masks = load_tree(prev / "masks.msgpack")
        prev_final = load_tree(prev / "final.msgpack")
        prune_cfg = oneshot_config(cfg.prune) if cfg.prune.schedule == "oneshot" else cfg.prune
        tickets = []
        for seed in seeds:
            i = prev_members.index(Member("ticket", seed))
            member = {"params": unstack(prev_final["params"], i), "batch_stats": unstack(prev_final["batch_stats"], i)}
            if prune_cfg.granularity != "weight":
                tickets.append(structured_prune(member["params"], unstack(prev_masks, i), prune_cfg, self.model))
                continue
            scores = self.scores(member, seed, level)
            tickets.append(prune_by_score(scores, unstack(prev_masks, i), member["params"], prune_cfg, self.structure))
        if cfg.rewind.mode == "weights":
            rewind = self._rewind_point(init, seeds)
            start_weights = [unstack(rewind, i) for i in range(len(seeds))]
        else:  # lr rewinding and fine-tuning keep the trained weights
            start_weights = [unstack(prev_final, prev_members.index(Member("ticket", s))) for s in seeds]
        engine = self._finetune() if cfg.rewind.mode == "finetune" else self.engine
        memos = {s: {} for s in seeds}  # per seed: the pruning-at-init masks, shared by an arm and its shuffle
        dense = functools.cache(lambda: (load_tree(store.level_dir(0) / "final.msgpack"),
                                         stored_members(store.level_dir(0))[0]))
        arm_starts: dict[tuple[str, int], ArmStart] = {}  # copies share copy 0's start
        for m in members:
            if (m.arm, m.seed) not in arm_starts:
                i = seeds.index(m.seed)
                arm_starts[m.arm, m.seed] = ArmStart(
                    start_weights[i], tickets[i], can_prune, m.seed, level, self.model, self.data.input_shape,
                    functools.partial(self.signals, seed=m.seed, level=level), memos[m.seed],
                    dense=functools.partial(self.dense_weights, dense, m.seed),
                    calib=functools.partial(self.calib_inputs, m.seed))
        # the one-shot arms of every seed are pruned together (one population), then read from the memos
        prepare_oneshot([(a, t) for (a, _), t in arm_starts.items() if a in ONESHOT_ARMS])
        starts = {key: ARMS[key[0]](t) for key, t in arm_starts.items()}  # (arm, seed) -> (weights, mask)
        weights = [starts[m.arm, m.seed][0] for m in members]
        masks = [starts[m.arm, m.seed][1] for m in members]
        if any(m.arm in ("set", "rigl") for m in members):  # the whole population in the moving-mask engine
            engine = self._dst_engine(cfg.rewind.mode == "finetune", can_prune)
        return LevelPlan(members, weights, masks, can_prune, cfg.rewind.step, engine)

    def _dst_engine(self, finetune: bool, can_prune) -> Engine:
        """The level's engine (same schedule) with SET/RigL's drop and grow inside its compiled segments."""
        if finetune not in self._dst_engines:
            base = self._finetune() if finetune else self.engine
            pc = self.cfg.prune
            fn = make_mask_update(can_prune, delta_t=pc.dst_delta_t, end_step=self.dst_end_step(),
                                  alpha=pc.dst_drop_fraction)
            self._dst_engines[finetune] = Engine(self.model, self.data, self.cfg.train, lr_fn=base.lr_fn,
                                                 mask_fn=fn)
        return self._dst_engines[finetune]

    def dst_end_step(self) -> int:
        """The global step from which set/rigl no longer update masks: ``round(prune.dst_end * steps)``."""
        return int(round(self.cfg.prune.dst_end * self.engine.num_steps))

    @staticmethod
    def dense_weights(stored, seed: int) -> dict:
        """The trained dense network of ``seed``: level 0's final weights of its member (ticket, seed)."""
        final, members = stored()
        k = members.index(Member("ticket", seed))
        return {"params": unstack(final["params"], k), "batch_stats": unstack(final["batch_stats"], k)}

    def calib_inputs(self, seed: int) -> np.ndarray:
        """The one-shot arms' calibration examples of ``seed``: its first ``prune.calib_batches`` training
        batches, ``[calib_batches * batch_size, ...]``."""
        idx = self.engine.order.indices(seed, 0, self.cfg.prune.calib_batches)
        return np.asarray(self.data.x_train)[np.asarray(idx).reshape(-1)]

    def signals(self, member: dict, seed: int, level: int) -> Signals:
        """What a criterion may use to score ``member`` ``{'params', 'batch_stats'}`` of ``seed``."""
        pc = self.cfg.prune

        def batches():  # the seed's first criterion_batches training batches
            idx = self.engine.order.indices(seed, 0, pc.criterion_batches)
            return [(self.data.x_train[i], self.data.y_train[i]) for i in idx]

        return Signals(self.model, member["params"], member["batch_stats"], seed, level, pc, batches,
                       tuple(self.data.input_shape))

    def scores(self, member: dict, seed: int, level: int):
        """Per-weight scores of ``prune.criterion`` for one trained member (higher = keep)."""
        return criterion_scores(member["params"], self.signals(member, seed, level))

    def initial_state(self, level: int, plan: "LevelPlan"):
        """The population TrainState a level starts from (masked weights, fresh optimizer)."""
        params = stack([w["params"] for w in plan.weights])  # numpy: the engine places it on its devices
        bs = stack([w["batch_stats"] for w in plan.weights])
        rngs = member_rngs(plan.members, level)
        return plan.engine.init(params, bs, stack(plan.masks), rngs, start=plan.start)

    def train_level(self, level: int, init: dict, log: WandbSink | None) -> None:
        """Prepare, train and store one level of this run alone (see :func:`run_group` for several):
        its missing members only, merged with those the level holds."""
        plan = self.prepare_level(level, init, self.missing(level)[0])
        if not plan.members:  # only small-dense members to add
            self.finish_level(level, plan, None, [], 0.0, {}, log)
            return
        state = self.initial_state(level, plan)
        t0 = time.time()
        with self.level_bar(level, plan.engine.num_steps - plan.start) as bar:
            result, masks, files = self.run_plan(level, plan, state, bar)
        self.finish_level(level, plan, result, masks, time.time() - t0, files, log)

    def snapshot_steps(self, level: int) -> tuple[int, ...]:
        """Steps whose weights a level keeps: the rewind point k > 0 of the dense level."""
        return (self.cfg.rewind.step,) if level == 0 and self.cfg.rewind.step > 0 else ()

    def earlybird(self, members: list[Member], index: list[int], can_prune) -> EarlyBird | None:
        """The early-bird observer of this run's dense members (``index`` into the population; stability
        copies left out), if it applies."""
        index = [k for k in index if members[k].copy == 0]
        if not earlybird_applies(self.cfg) or not index:
            return None
        return EarlyBird(self.cfg, can_prune, [members[k].seed for k in index], index, self.engine.order.spe,
                         self.structure)

    def run_plan(self, level: int, plan: "LevelPlan", state, bar, earlybirds: list | None = None):
        """Train a prepared level: (TrainResult, final masks per member, extra level files).

        The dense level records the early-bird mask distances (:mod:`lth.lottery.earlybird`) into
        ``earlybird.parquet``; ``earlybirds``: the observers of several runs trained together instead
        (their callers store the tables)."""
        if level > 0 and self.cfg.prune.schedule == "gradual":
            result, masks, agp = self._run_gradual(state, plan.members, plan.can_prune, bar)
            return result, masks, {"agp.parquet": parquet_bytes(agp)}
        split = parts(plan.members)
        if level > 0 and (split["evaluate"] or split["finetune"]):
            result, trained = self._run_with_oneshot(level, plan, split, bar)
            if trained is None or trained[0].engine.mask_fn is None:
                return result, plan.masks, {}
            # set/rigl beside one-shot arms: the masks they end with and their regrowth table, as below
            host = to_numpy(result.state.mask)
            masks = [unstack(host, k) if m.arm in MODES else plan.masks[k] for k, m in enumerate(plan.members)]
            table = dst_table(*trained, self.dst_end_step(), self.cfg.prune.dst_delta_t)
            return result, masks, {"dst.parquet": parquet_bytes(table)}
        own = level == 0 and earlybirds is None
        if own:
            eb = self.earlybird(plan.members, list(range(len(plan.members))), plan.can_prune)
            earlybirds = [eb] if eb is not None else []
        watch = earlybirds if level == 0 else []
        moving = plan.engine.mask_fn is not None
        result = plan.engine.run(state, [data_seed(m) for m in plan.members], start=plan.start,
                                 snapshot_steps=self.snapshot_steps(level), progress=bar,
                                 observe_steps=epoch_ends(plan.engine.num_steps, plan.engine.order.spe) if watch else (),
                                 observe=(lambda step, w: [e(step, w) for e in watch]) if watch else None,
                                 member_args=[MODES.get(m.arm, 0) for m in plan.members] if moving else None)
        files = {"earlybird.parquet": parquet_bytes(watch[0].table())} if own and watch else {}
        if any(m.arm in MODES for m in plan.members):  # static/set/rigl: the weights ever active per layer
            files["ever_active.parquet"] = parquet_bytes(ever_table(plan, to_numpy(result.state.mask),
                                                                    to_numpy(result.state.ever)))
        if not moving:
            return result, plan.masks, files
        # set/rigl: the masks they end with (every other member's is the one it started with)
        host = to_numpy(result.state.mask)
        masks = [unstack(host, k) if m.arm in MODES else plan.masks[k] for k, m in enumerate(plan.members)]
        files["dst.parquet"] = parquet_bytes(dst_table(plan, result, self.dst_end_step(), self.cfg.prune.dst_delta_t))
        return result, masks, files

    def _run_with_oneshot(self, level: int, plan: "LevelPlan", split: dict, bar):
        """A level with one-shot arms (:mod:`lth.lottery.oneshot`): the others train on the level's engine
        (set/rigl members with their mask updates), the plain one-shot members are evaluated as pruned, the
        ``*_ft`` ones fine-tuned; one result, and the (plan, result) of the trained part (None: none)."""
        def sub(idx, engine, start):
            p = LevelPlan([plan.members[k] for k in idx], [plan.weights[k] for k in idx],
                          [plan.masks[k] for k in idx], plan.can_prune, start, engine)
            return p, self.initial_state(level, p)

        pieces, trained = [], None
        if split["train"]:
            p, state = sub(split["train"], plan.engine, plan.start)
            moving = p.engine.mask_fn is not None
            r = p.engine.run(state, [data_seed(m) for m in p.members], start=p.start, progress=bar,
                             member_args=[MODES.get(m.arm, 0) for m in p.members] if moving else None)
            pieces.append((split["train"], r))
            trained = (p, r)
        if split["evaluate"]:
            p, state = sub(split["evaluate"], self.engine, 0)
            pieces.append((split["evaluate"], TrainResult(state=state, records=evaluate_records(self.engine, state))))
        if split["finetune"]:
            p, state = sub(split["finetune"], self._oneshot(), 0)
            pieces.append((split["finetune"], p.engine.run(state, [data_seed(m) for m in p.members])))
        return merge(pieces, len(plan.members)), trained

    def _oneshot(self) -> Engine:
        if self._share is not None:  # the group shares the *_ft settings (population_key)
            return self._share._oneshot()
        if self._oneshot_engine is None:
            self._oneshot_engine = finetune_engine(self.model, self.data, self.cfg)
        return self._oneshot_engine

    def finish_level(self, level: int, plan: "LevelPlan", result, masks, wall_s: float, files: dict,
                     log: WandbSink | None) -> None:
        """Evaluate and assemble the members trained now (``plan.members``, ``result``; None when only
        small-dense members are added), train the missing small-dense members, and store the level:
        a new level as is; a level that grows as the stored one with the new members appended (the
        stored members' arrays and table rows kept bit for bit, their member indices unchanged;
        small-dense rows are numbered after the main population), swapped in crash-safely."""
        cfg, store = self.cfg, self.store
        members, can_prune = plan.members, plan.can_prune
        grow = store.is_complete(level)
        d = store.level_dir(level)
        old_main, old_small = stored_members(d) if grow else ([], [])
        old_metrics = read_parquet(d / "metrics.parquet") if grow else None
        if old_metrics is not None and "copy" not in old_metrics:  # stored before stability copies
            old_metrics.insert(list(old_metrics.columns).index("seed") + 1, "copy", 0)
        new_files = dict(files)
        frames: dict[str, pd.DataFrame] = {}
        metrics = None
        if members:
            densities = [density(mk, can_prune) for mk in masks]
            if self.snapshot_steps(level):
                extend_stacked(store, "rewind.msgpack", to_numpy(result.snapshots[cfg.rewind.step]),
                               [m.seed for m in members])
            final = {"params": to_numpy(result.state.params), "batch_stats": to_numpy(result.state.batch_stats)}
            metrics = self._metrics_table(level, members, densities, result.records, wall_s, result.diverged)
            metrics["param_count"] = [kept_count(masks[k]) for k in metrics["member"]]
            frames["metrics.parquet"] = metrics
            act = self._activation_sparsity(result.state, members)
            if act is not None:
                frames["activations.parquet"] = act
            frames["sparsity.parquet"] = self._sparsity_table(level, members, final["params"], masks, can_prune)
            trees = {"masks.msgpack": to_numpy(stack(masks)), "final.msgpack": final}
        else:
            trees = {}
        frames = {name: df for name, df in frames.items() if len(df.columns)}  # only copies: no sparsity rows
        if grow:  # the stored members first, bit for bit; the new ones after them, numbered on
            offset = len(old_main)
            for name, df in frames.items():
                old = read_parquet(d / name) if (d / name).is_file() else None
                if name == "metrics.parquet":
                    old = old_metrics[old_metrics["arm"] != "small_dense"]
                df = df.assign(member=df["member"] + offset)
                frames[name] = df if old is None else pd.concat([old, df], ignore_index=True)
            for name, tree in trees.items():
                trees[name] = concat_stacked(load_tree(d / name), tree)
        main = old_main + list(members)
        # small-dense baselines: those this config wants and the level lacks
        small_missing = self.missing(level)[1]
        small_frames, small_new = [], None
        if old_small:
            small_frames.append(old_metrics[old_metrics["arm"] == "small_dense"])
        small_final = load_tree(d / "small_dense_final.msgpack") if old_small else None
        if small_missing:
            ticket_mask, ticket_density = self._small_dense_target(level, d if grow else None, old_main, members,
                                                                   masks, can_prune)
            width = None if old_metrics is None or not old_small else float(
                old_metrics.loc[old_metrics["arm"] == "small_dense", "width"].iloc[0])
            # a level's small-dense members all train one way: a grown level as its stored ones did
            padded = self._small_dense_pads() and (not old_small or (d / SMALL_DENSE_PADDED_FILE).is_file())
            df, fin = self._train_small_dense(level, [m.seed for m in small_missing], ticket_mask,
                                              ticket_density, width, padded)
            small_frames.append(df)
            small_new = df
            small_final = fin if small_final is None else concat_stacked(small_final, fin)
        small = old_small + small_missing
        if small_frames:  # numbered after the (grown) main population, in small_dense_final's order
            sm = pd.concat(small_frames, ignore_index=True)
            pos = {m.seed: k for k, m in enumerate(small)}
            sm["member"] = [len(main) + pos[int(x)] for x in sm["seed"]]
            base = frames.get("metrics.parquet")
            if base is None and grow:
                base = old_metrics[old_metrics["arm"] != "small_dense"]
            frames["metrics.parquet"] = sm if base is None else pd.concat([base, sm], ignore_index=True)
        out: dict[str, bytes] = {}
        if grow:  # files this merge does not rewrite are kept as they are (e.g. agp.parquet)
            for name in read_sums(d / "COMPLETE"):  # plain names inside the level (checked)
                out[name] = (d / name).read_bytes()
        out.update(new_files)
        if grow:  # a per-seed table of the new members (earlybird.parquet) goes after the stored rows
            for name in new_files:
                if name.endswith(".parquet") and (d / name).is_file():
                    out[name] = parquet_bytes(pd.concat([read_parquet(d / name), pd.read_parquet(io.BytesIO(new_files[name]))],
                                                        ignore_index=True))
        out[MEMBERS_FILE] = members_bytes(main)
        for name, tree in trees.items():
            out[name] = tree_bytes(tree)
        for name, df in frames.items():
            out[name] = parquet_bytes(df.reset_index(drop=True))
        if small_missing and padded:
            out[SMALL_DENSE_PADDED_FILE] = json.dumps({"full_width": self.cfg.model.width}).encode()
        if small:
            out[SMALL_DENSE_FILE] = members_bytes(small)
            out["small_dense_final.msgpack"] = tree_bytes(small_final)
        store.write_level(level, out)
        self.trained_levels.append(level)
        if log is not None:  # every member trained now, small-dense too; copies are stability measurements
            new = [f[f["copy"] == 0] for f in (metrics, small_new) if f is not None]
            if new:
                log.log_level(level, plan.engine.num_steps, pd.concat(new, ignore_index=True).to_dict("records"),
                              sparsity=frames.get("sparsity.parquet"))

    def _small_dense_target(self, level, stored_dir, old_main, members, masks, can_prune):
        """The ticket mask whose non-zero count the small-dense models match, and its density: the
        first ticket of the level (stored members first)."""
        if stored_dir is not None and any(m.arm == "ticket" for m in old_main):
            k = next(i for i, m in enumerate(old_main) if m.arm == "ticket")
            mask = unstack(load_tree(stored_dir / "masks.msgpack"), k)
        else:
            mask = masks[next(i for i, m in enumerate(members) if m.arm == "ticket")]
        return mask, density(mask, can_prune)

    def _run_gradual(self, state, members, can_prune, bar):
        """AGP: one training run; at t0, t0 + dt, ..., t0 + n dt every member's layers are pruned by
        magnitude to the schedule's density. Returns (result, final masks, schedule table)."""
        pc, engine = self.cfg.prune, self.engine
        updates = [pc.agp_start_step + j * pc.agp_frequency for j in range(pc.agp_updates + 1)]
        seeds = [m.seed for m in members]
        records, diverged, rows, pos = [], {}, [], 0
        for u in sorted(set(updates) | {engine.num_steps}):
            if u > pos:
                res = engine.run(state, seeds, start=pos, stop=u, progress=bar)
                state, pos = res.state, u
                records += res.records
                for k, v in res.diverged.items():
                    diverged.setdefault(k, v)
            if u == engine.num_steps and u not in updates:
                break
            target = agp_density(u, pc)
            params = to_numpy(state.params)
            masks = [prune_to_density(magnitude_scores(unstack(params, k)), unstack(to_numpy(state.mask), k),
                                      can_prune, target) for k in range(len(members))]
            mask_pop = to_device(stack(masks))
            state = engine.remask(state, mask_pop)
            rows.append({"step": u, "target_density": target, "density": density(masks[0], can_prune)})
        final_masks = [unstack(to_numpy(state.mask), k) for k in range(len(members))]
        return TrainResult(state=state, records=records, diverged=diverged), final_masks, pd.DataFrame(rows)

    def _activation_sparsity(self, state, members) -> pd.DataFrame | None:
        """Fraction of exact-zero ReLU outputs per hidden layer on the test split, per member."""
        rows = []
        x = self.data.x_test[:2000]
        host = to_numpy((state.params, state.batch_stats))  # slicing on the host compiles nothing
        for k, m in enumerate(members):
            if m.copy:
                continue
            member = jax.tree.map(lambda a: a[k], host)
            for layer, frac in activation_sparsity(self.model, member[0], member[1], x).items():
                rows.append({"arm": m.arm, "seed": m.seed, "member": k, "layer": layer, "zero_fraction": frac})
        return pd.DataFrame(rows) if rows else None

    def _train_small_dense(self, level: int, seeds: list[int], ticket_mask, ticket_density: float,
                           width: float | None = None, padded: bool = False) -> tuple[pd.DataFrame, dict]:
        """Train, for each of ``seeds``, a dense model whose parameter count matches ``ticket_mask``'s
        (the level's first ticket; layerwise counts are equal for every seed). ``width``: the width
        the level's stored small-dense models have (a level that grows by seeds keeps it).

        ``padded``: train it inside the full-width model with the extra units masked off
        (:func:`lth.prune.baselines.pads_exactly`), so every level runs the programs level 0 compiled
        instead of compiling its own; the narrow network's init, and its weights are stored. Equal to
        the narrow training up to float rounding."""
        cfg = self.cfg
        target = kept_count(ticket_mask)
        if width is None:
            width, count = match_width(cfg.model, self.data.num_classes, self.data.input_shape, target)
            if abs(count - target) > 0.02 * target:
                warnings.warn(f"level {level}: the closest small-dense model has {count} parameters, "
                              f"{100 * (count / target - 1):+.1f}% off the ticket's {target}", RuntimeWarning)
        else:
            count = count_at_width(cfg.model, width, self.data.num_classes, tuple(self.data.input_shape))
        model = build_model(dataclasses.replace(cfg.model, width=width), self.data.num_classes,
                            self.data.input_shape)
        keys = seed_keys(seeds)
        # padded: the narrow init drawn by the full-width model's program (bit-identical; no program per width)
        drawn = narrow_init(model, self.model, keys, tuple(self.data.input_shape)) if padded else None
        params, bs = (drawn, {}) if drawn is not None else init_population(model, keys, self.data.input_shape)
        ones = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
        if padded:  # the full-width model's programs, with the units beyond the narrow widths masked off
            engine = self.engine
            full, narrow = (jax.eval_shape(lambda k, m=m: init_variables(m, k, self.data.input_shape)[0],
                                           jax.random.key(0)) for m in (self.model, model))
            (params, ones), bs = pad_params(params, full), {}
        else:
            engine = Engine(model, self.data, cfg.train)
        state = engine.init(params, bs, ones, keys)
        t0 = time.time()
        with self.level_bar(level, engine.num_steps, "small-dense") as bar:
            result = engine.run(state, seeds, progress=bar)
        final = to_numpy(result.state.params)
        if padded:
            final = unpad_params(final, narrow)
        members = [Member("small_dense", s) for s in seeds]
        df = self._metrics_table(level, members, [ticket_density] * len(seeds), result.records,
                                 time.time() - t0, result.diverged)
        df["param_count"] = count
        df["width"] = width
        return df, {"params": final, "batch_stats": to_numpy(result.state.batch_stats)}

    def _small_dense_pads(self) -> bool:
        """Whether this run's small-dense models train padded to full width (:func:`pads_exactly`; the
        model at a small width stands for every width: the layer kinds do not change with it)."""
        small = build_model(dataclasses.replace(self.cfg.model, width=self.cfg.model.width / 2),
                            self.data.num_classes, self.data.input_shape)
        return pads_exactly(small, self.model, tuple(self.data.input_shape))

    def _finetune(self) -> Engine:
        if self._share is not None:  # same train and rewind config: the same compiled programs
            return self._share._finetune()
        if self._finetune_engine is None:
            lr = self.cfg.rewind.finetune_lr or final_lr(self.cfg.train, self.engine.num_steps)
            self._finetune_engine = Engine(self.model, self.data, self.cfg.train, lr_fn=optax.constant_schedule(lr),
                                           lr_key=("constant", float(lr)))
        return self._finetune_engine

    def _metrics_table(self, level, members, densities, records, wall_s, diverged) -> pd.DataFrame:
        return metrics_table(self.cfg.run_id, level, members, densities, records, wall_s, diverged)

    def _sparsity_table(self, level, members, final_params, masks, can_prune) -> pd.DataFrame:
        return sparsity_table(level, members, final_params, masks, can_prune, self.structure)

    def level_bar(self, level: int, total: int, what: str = "", start: int | None = None):
        """Progress of one level's ``total`` steps; level L > 0 starts at the rewind step unless ``start``."""
        if start is None:
            start = 0 if level == 0 or what else self.cfg.rewind.step
        desc = f"level {level}/{self.cfg.prune.levels}{' ' + what if what else ''}"
        return progress_bar(self.progress, desc, total, start, lm=is_language_model(self.data))


def metrics_table(run_id: str, level: int, members, densities, records, wall_s: float, diverged) -> pd.DataFrame:
    """Tidy metrics of a trained population: one row per (member, step, split)."""
    df = pd.DataFrame.from_records(records)
    es = early_stop_steps(records)
    df["run_id"] = run_id
    df["level"] = level
    df["arm"] = [members[k].arm for k in df["member"]]
    df["seed"] = [members[k].seed for k in df["member"]]
    df["copy"] = [getattr(members[k], "copy", 0) for k in df["member"]]
    df["density"] = [densities[k] for k in df["member"]]
    df["early_stop_step"] = [es.get(k, -1) for k in df["member"]]
    df["diverged_step"] = [diverged.get(k, -1) for k in df["member"]]
    df["wall_s"] = wall_s
    cols = ["run_id", "level", "arm", "seed", "copy", "member", "density", "step", "split", "loss", "accuracy",
            "early_stop_step", "diverged_step", "wall_s"]
    cols += [c for c in ("perplexity", "bits_per_byte") if c in df]  # language models (lth.train.lm_metrics)
    return df[cols]


def dst_table(plan: "LevelPlan", result: TrainResult, end_step: int, delta_t: int) -> pd.DataFrame:
    """Per set/rigl member, update step and prunable layer: the weights regrown there (``dst.parquet``)."""
    names = [jax.tree_util.keystr(p, simple=True, separator="/")
             for (p, _), c in zip(jax.tree_util.tree_flatten_with_path(plan.can_prune)[0],
                                  jax.tree.leaves(plan.can_prune)) if c]
    rows = []
    for t in update_steps(plan.start, plan.engine.num_steps, delta_t=delta_t, end_step=end_step):
        regrown = np.asarray(result.mask_info[t]["regrown"])  # [K, L]
        for k, m in enumerate(plan.members):
            if m.arm in ("set", "rigl"):
                rows += [{"arm": m.arm, "seed": m.seed, "copy": m.copy, "step": t, "layer": n,
                          "regrown": int(regrown[k, j])} for j, n in enumerate(names)]
    return pd.DataFrame(rows, columns=["arm", "seed", "copy", "step", "layer", "regrown"])


def ever_table(plan: "LevelPlan", final_masks, ever) -> pd.DataFrame:
    """Per static/set/rigl member and prunable layer (``ever_active.parquet``): ``size``, ``active`` (weights
    in the final mask) and ``ever`` (weights active at any step of the level's training: the union of its
    masks, :attr:`lth.train.TrainState.ever`). ``final_masks``, ``ever``: the population's, ``[K, ...]``."""
    flat = jax.tree_util.tree_flatten_with_path(plan.can_prune)[0]
    names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in flat]
    which = [bool(c) for _, c in flat]
    fin, evr = jax.tree.leaves(final_masks), jax.tree.leaves(ever)
    rows = []
    for k, m in enumerate(plan.members):
        if m.arm not in MODES:
            continue
        for n, c, a, e in zip(names, which, fin, evr):
            if c:
                rows.append({"arm": m.arm, "seed": m.seed, "copy": m.copy, "layer": n, "size": int(a[k].size),
                             "active": int(np.count_nonzero(a[k])), "ever": int(np.count_nonzero(e[k]))})
    return pd.DataFrame(rows, columns=["arm", "seed", "copy", "layer", "size", "active", "ever"])


def sparsity_table(level: int, members, final_params, masks, can_prune, structure=None) -> pd.DataFrame:
    """Per member and layer: shape, count, non-zeros and density of the trained weights (stability copies
    left out: they share copy 0's mask); ``structure``: the model's (:func:`lth.models.structure_of`)."""
    rows = []
    for k, m in enumerate(members):
        if getattr(m, "copy", 0):
            continue
        for r in sparsity_rows(unstack(final_params, k), masks[k], can_prune, structure):
            rows.append({"level": level, "arm": m.arm, "seed": m.seed, "member": k, **r})
    return pd.DataFrame.from_records(rows)


@contextlib.contextmanager
def progress_bar(enabled: bool, desc: str, total: int, start: int = 0, lm: bool = False):
    """A tqdm bar over ``total`` training steps from global step ``start``; yields the engine's
    ``progress(step, metrics)`` callback (None when disabled). ``lm``: a language model, shown in bits
    per byte (:func:`progress_postfix`)."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=True, dynamic_ncols=True)
    last = [start]

    def update(step: int, metrics: dict) -> None:
        bar.update(step - last[0])
        last[0] = step
        bar.set_postfix(progress_postfix(metrics, lm))

    try:
        yield update
    finally:
        bar.close()


def progress_postfix(metrics: dict, lm: bool = False) -> dict[str, str]:
    """The progress bar's numbers from the engine's ``{split: (loss, accuracy)}``: the train loss and the
    val/test accuracy in percent (a person reads percent), or for a language model (``lm``) the val/test
    bits per byte (:func:`lth.train.lm_metrics`; lower is better)."""
    post = {"loss": f"{metrics['train'][0]:.3f}"}
    for split in ("val", "test"):
        if split in metrics:
            loss, acc = metrics[split]
            if lm:
                post[f"{split}_bpb"] = f"{lm_metrics(loss)['bits_per_byte']:.3f}"
            else:
                post[f"{split}_acc"] = f"{100 * acc:.2f}%"
    return post


def run_lottery(cfg: ExperimentConfig, out: str | Path, *, progress: bool | None = None) -> RunStore:
    """Run or resume the IMP experiment ``cfg`` into ``out``; returns its store.

    A finished run returns at once, without loading data or compiling anything. A run that is stored
    with fewer levels, seeds or arms than ``cfg`` asks for grows: only the missing members train.
    """
    store = RunStore(prepare_root(out), cfg.run_id)
    store.finish_swaps()  # a level swap a killed grow left half done, even in a run found finished
    if run_is_finished(store, cfg):  # every wanted member of every wanted level is stored
        return store
    lottery = Lottery(cfg, out, progress=progress)
    warn_few_evals([lottery])
    sink = open_sink(lottery)
    try:
        return lottery.run(sink)
    finally:
        if sink is not None:
            sink.close()


def few_evals_warning(cfg: ExperimentConfig, num_steps: int, steps_per_epoch: int) -> str | None:
    """One line (None when all is well) when a level of ``cfg`` evaluates at its last step only
    (``train.eval_every``, default one epoch, >= the steps a level trains): its learning curve is one
    point and its early-stop step can only be the last step."""
    every = cfg.train.eval_every or steps_per_epoch
    spans = [num_steps] + ([num_steps - cfg.rewind.step] if cfg.prune.levels >= 1 else [])
    n = min(spans)  # steps of the shortest level: levels >= 1 start at the rewind step
    if sum(num_steps - n < s <= num_steps for s in eval_steps(cfg.train, num_steps, steps_per_epoch)) >= 2:
        return None
    what = (f"train.eval_every = {cfg.train.eval_every}" if cfg.train.eval_every
            else f"one evaluation per epoch ({every} steps)")
    return (f"lth: warning: {what} >= the {n} steps of a level, so a level is evaluated at its last step only: no "
            f"learning curve, and the early-stop step is always the last step; set train.eval_every to less than "
            f"{n // 2 + 1} (e.g. --set train.eval_every={max(1, n // 10)}, 10 points a level)")


def warn_few_evals(lotteries: list[Lottery]) -> None:
    """Print :func:`few_evals_warning` of each run to stderr before any training, each text once."""
    from tqdm import tqdm  # its write() keeps a progress bar on screen (lth sweep's) intact

    said = set()
    for lot in lotteries:
        msg = few_evals_warning(lot.cfg, lot.engine.num_steps, lot.engine.order.spe)
        if msg is not None and msg not in said:
            said.add(msg)
            tqdm.write(msg, file=sys.stderr)


def open_sink(lottery: Lottery) -> WandbSink | None:
    """The run's W&B sink (None with ``log.wandb = 'disabled'``), also kept as ``lottery.sink`` for the
    later stages of the pipeline."""
    cfg = lottery.cfg
    if cfg.log.wandb == "disabled":
        return None
    lottery.sink = WandbSink(cfg.log.wandb, cfg.log.project, cfg.name, cfg.run_id, flatten(cfg.to_dict()),
                             lottery.store.path)
    return lottery.sink
