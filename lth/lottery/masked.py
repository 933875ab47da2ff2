"""Train a given mask: ``lth train EXPERIMENT --mask MASK``.

The mask comes from a stored level (``OUT/<run_id>/level_003``, or its ``masks.msgpack``) or from
any flax-msgpack file whose tree matches the model's params. Every seed of the experiment starts
from its own init (the same weights ``lth train`` and ``lth lottery`` start from: ``key(seed)``)
with the mask applied, and trains with the engine's masked step, so pruned weights stay exactly 0.

Which mask each seed gets:

- a file with ``members.json`` beside it (a stored level): the members of ``arm`` (default
  ``ticket``); each seed takes the mask of the same seed; a seed the file has no mask for is an
  error, unless the arm has a single member, whose mask is then shared by every seed;
- a file without ``members.json``: one mask (stacked ``[1, ...]`` or unstacked), shared by every
  seed; several stacked masks without ``members.json`` are an error (nothing says whose they are).

The run is stored like level 0 of an IMP run (``hparams.json``, ``init.msgpack``, ``level_000/``)
so ``analysis.load_runs``, ``lth report``, ``lth sparsity``, ``lth sensitivity`` and ``lth
quantize`` read it. Its run id hashes the result-affecting config *and* the mask (sha256 of
``masks.msgpack`` and ``members.json``, the arm and the seed mapping), so it never collides with the
dense run or with another mask; ``hparams.json`` records the source under ``mask``. Metrics rows
carry the arm whose mask was trained, the mask's density and ``mask_seed`` (the stored member's seed).

Nothing is written before the mask is validated: a mask whose layers or shapes differ from the
model's is a one-line :class:`MaskError` naming the file, the layer and both shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from .. import __version__
from ..config import ConfigError, ExperimentConfig
from ..data import load_dataset
from ..models import build_model, check_output_width, structure_of
from ..prune.masks import density, prunable
from ..store import (COMPLETE, RunStore, StoreError, load_tree, parquet_bytes, prepare_root, read_sums,
                     tree_bytes)
from .runner import Member, metrics_table, progress_bar, sparsity_table, stored_init
from ..train import Engine, init_variables, is_language_model, stack, unstack
from ..trees import kept_count, seed_keys, to_numpy
from ..wandb_log import WandbSink, flatten

MASKS_FILE = "masks.msgpack"
MEMBERS_FILE = "members.json"


class MaskError(ConfigError):
    """A mask that cannot be trained with this experiment; the one-line message names the file."""


@dataclass(frozen=True)
class MaskSource:
    """The masks of one experiment's seeds, read from a file (or a stored level)."""

    file: Path  # the masks.msgpack (absolute)
    sha256: str  # of ``file``
    members_file: Path | None  # members.json beside it, if any
    members_sha256: str | None
    arm: str | None  # arm whose masks are used (None: the file has no members.json)
    source_seeds: tuple[int | None, ...]  # per experiment seed: seed of the stored member used
    masks: tuple[Any, ...]  # per experiment seed: nested dict of bool arrays shaped like params

    def digest(self) -> dict:
        """What identifies the trained masks (hashed into the run id)."""
        return {"sha256": self.sha256, "members_sha256": self.members_sha256, "arm": self.arm,
                "source_seeds": list(self.source_seeds)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _shape(shape) -> str:
    return "x".join(map(str, shape)) if len(shape) else "scalar"


def resolve(path: str | Path) -> tuple[Path, Path | None]:
    """(masks file, members.json beside it or None) for a level folder or a masks file."""
    p = Path(path).expanduser()
    if p.is_dir():
        f = p / MASKS_FILE
        if not f.is_file():
            raise MaskError(f"--mask {path}: folder has no {MASKS_FILE} (expected a stored level such as "
                            f"OUT/<run_id>/level_003, or a masks file)")
    elif p.is_file():
        f = p
    else:
        raise MaskError(f"--mask {path}: no such file or folder")
    members = f.parent / MEMBERS_FILE
    return f.resolve(), (members.resolve() if members.is_file() else None)


def _check_level_checksums(f: Path, members: Path | None, blobs: dict[str, bytes]) -> None:
    """A stored level's COMPLETE marker lists sha256 sums: refuse files that no longer match them."""
    marker = f.parent / COMPLETE
    if not marker.is_file():
        return
    try:
        sums = read_sums(marker)
    except StoreError:  # an unreadable marker: nothing to check against
        return
    for path in (f, members):
        if path is None or path.name not in sums:
            continue
        if _sha256(blobs[path.name]) != sums[path.name]:
            raise MaskError(f"{path} does not match the checksum in {marker} (truncated or modified)")


def _flat(tree) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/") if tree else {}


def load_masks(path: str | Path, params_shapes: Any, seeds, arm: str = "ticket", *,
               model_name: str = "the model") -> MaskSource:
    """Read and validate the masks for ``seeds``; MaskError/StoreError (one line) when unusable.

    ``params_shapes`` is the params tree of one member (arrays or ``jax.ShapeDtypeStruct``).
    """
    f, members_file = resolve(path)
    blobs = {f.name: f.read_bytes()}
    members = None
    if members_file is not None:
        blobs[members_file.name] = members_file.read_bytes()
        try:
            members = json.loads(blobs[members_file.name])
            # a stability copy (copy > 0) holds its copy 0's mask: not a member of its own here
            members = [(str(m["arm"]), int(m["seed"])) if not m.get("copy", 0) else ("", -1) for m in members]
        except (ValueError, KeyError, TypeError) as e:
            raise MaskError(f"{members_file}: not a members list of {{arm, seed}} ({type(e).__name__}: {e})"
                            ) from None
    _check_level_checksums(f, members_file, blobs)
    tree = load_tree(f)
    if not isinstance(tree, dict) or not tree:
        raise MaskError(f"{f}: not a mask tree (expected a nested table of arrays shaped like the params)")
    if set(tree) == {"params"} and set(_flat(params_shapes)) != set(_flat(tree)):
        tree = tree["params"]  # a {'params': ...} wrapper
    flat_want = _flat(params_shapes)  # kernels first, so a wrong width is reported on the kernel
    want = {k: tuple(flat_want[k].shape) for k in sorted(flat_want, key=lambda n: not n.endswith("kernel"))}
    got = {k: np.asarray(v) for k, v in _flat(tree).items()}
    for name in want:
        if name not in got:
            raise MaskError(f"{f}: mask has no layer {name} (of {model_name}, shape {_shape(want[name])}); "
                            f"mask layers: {', '.join(got)}")
    for name in got:
        if name not in want:
            raise MaskError(f"{f}: mask layer {name} is not a layer of {model_name} "
                            f"(its layers: {', '.join(want)})")
    # stacked [K, ...] (a stored level, or any file whose leaves have one more axis) or one mask
    first = next(iter(want))
    stacked = members is not None or got[first].ndim == len(want[first]) + 1
    k = len(members) if members is not None else (got[first].shape[0] if stacked else 1)
    for name, shape in want.items():
        a = got[name]
        member_shape = a.shape[1:] if stacked else a.shape
        if tuple(member_shape) != shape:
            raise MaskError(f"{f}: mask layer {name} has shape {_shape(member_shape)} but {model_name}'s "
                            f"is {_shape(shape)}")
        if stacked and a.shape[0] != k:
            what = f"{members_file} lists {k} members" if members is not None else f"layer {first} has {k}"
            raise MaskError(f"{f}: mask layer {name} stacks {a.shape[0]} members but {what}")
        if a.dtype != np.bool_:
            if not (np.issubdtype(a.dtype, np.number) and np.isin(a, (0, 1)).all()):
                raise MaskError(f"{f}: mask layer {name} holds values other than 0 and 1 "
                                f"(dtype {a.dtype}); is it a weights file?")
            got[name] = a != 0
    seeds = [int(s) for s in seeds]
    if members is None:
        if k != 1:
            raise MaskError(f"{f}: holds {k} stacked masks but no {MEMBERS_FILE} beside it says which seed "
                            f"each belongs to; pass a stored level folder or a file with one mask")
        picks, source_seeds, used_arm = [0] * len(seeds), (None,) * len(seeds), None
    else:
        of_arm = [(i, s) for i, (a, s) in enumerate(members) if a == arm]
        if not of_arm:
            arms = sorted({a for a, _ in members if a})
            raise MaskError(f"{members_file}: no {arm!r} masks (arms here: {', '.join(arms)}); "
                            f"choose one with --mask-arm")
        if len(of_arm) == 1:  # one mask: shared by every seed
            picks, source_seeds = [of_arm[0][0]] * len(seeds), (of_arm[0][1],) * len(seeds)
        else:
            by_seed = {s: i for i, s in of_arm}
            missing = [s for s in seeds if s not in by_seed]
            if missing:
                have = sorted(by_seed)
                raise MaskError(f"{f}: no {arm!r} mask for seed {missing[0]} (it holds seeds "
                                f"{have}); train a subset, e.g. --set seeds=[{','.join(map(str, have))}]")
            picks, source_seeds = [by_seed[s] for s in seeds], tuple(seeds)
        used_arm = arm
    nested = traverse_util.unflatten_dict({tuple(n.split("/")): a for n, a in got.items()})
    masks = tuple(jax.tree.map(lambda a, i=i: np.array(a[i] if stacked else a, bool), nested) for i in picks)
    return MaskSource(f, _sha256(blobs[f.name]), members_file,
                      _sha256(blobs[members_file.name]) if members_file else None,
                      used_arm, source_seeds, masks)


def run_id(cfg: ExperimentConfig, source: MaskSource) -> str:
    """Hash of the result-affecting config and the mask: differs from the dense run's ``cfg.run_id``."""
    blob = json.dumps({"config": cfg.result_dict(), "mask": source.digest()}, sort_keys=True,
                      separators=(",", ":"))
    return _sha256(blob.encode())[:12]


class MaskedRun:
    """One experiment's seeds trained with given masks, stored as ``out/<run_id>/level_000``."""

    def __init__(self, cfg: ExperimentConfig, out: str | Path, mask: str | Path, arm: str = "ticket", *,
                 progress: bool | None = None):
        self.cfg = cfg = cfg.replace(prune=dataclasses.replace(cfg.prune, levels=0), arms=("ticket",))
        self.progress = cfg.log.progress if progress is None else progress
        self.data = load_dataset(cfg.data)
        try:
            self.model = build_model(cfg.model, self.data.num_classes, self.data.input_shape)
            check_output_width(self.model, self.data.num_classes, self.data.input_shape)
            shapes = jax.eval_shape(lambda k: init_variables(self.model, k, self.data.input_shape)[0],
                                    jax.random.key(0))
        except ValueError as e:  # model/data mismatch
            raise ConfigError(f"{cfg.model.name} on {cfg.data.name}: {e}") from None
        self.source = load_masks(mask, shapes, cfg.seeds, arm, model_name=f"model {cfg.model.name}")
        self.mask_arg = str(mask)
        try:
            self.engine = Engine(self.model, self.data, cfg.train)
        except ValueError as e:  # batch larger than the data set
            raise ConfigError(f"{cfg.model.name} on {cfg.data.name}: {e}") from None
        self.run_id = run_id(cfg, self.source)
        self.store = RunStore(prepare_root(out), self.run_id)  # the first write: after validation

    def hparams(self) -> dict:
        s = self.source
        return {**self.cfg.to_dict(), "run_id": self.run_id, "lth_version": __version__,
                "num_steps": self.engine.num_steps, "data_fingerprint": self.data.fingerprint,
                "mask": {"source": self.mask_arg, "file": str(s.file), "sha256": s.sha256,
                         "members_file": str(s.members_file) if s.members_file else None,
                         "members_sha256": s.members_sha256, "arm": s.arm,
                         "source_seeds": [-1 if x is None else x for x in s.source_seeds]}}

    def run(self) -> RunStore:
        cfg, store = self.cfg, self.store
        with store.lock():
            if store.is_complete(0):
                return store
            store.write_hparams(self.hparams())
            # the same init as the dense run of these seeds
            self._train(stored_init(store, self.model, cfg.seeds, self.data.input_shape))
        return store

    def _train(self, init: dict) -> None:
        cfg, store, engine = self.cfg, self.store, self.engine
        seeds = list(cfg.seeds)
        masks = list(self.source.masks)
        arm = self.source.arm or "ticket"
        can_prune = prunable(unstack(init["params"], 0), cfg.prune, structure_of(self.model))
        state = engine.init(init["params"], init["batch_stats"], stack(masks), seed_keys(seeds))
        t0 = time.time()
        with progress_bar(self.progress, "masked", engine.num_steps, lm=is_language_model(engine.data)) as bar:
            result = engine.run(state, seeds, progress=bar)
        wall_s = time.time() - t0
        final = {"params": to_numpy(result.state.params), "batch_stats": to_numpy(result.state.batch_stats)}
        densities = [density(m, can_prune) for m in masks]
        kept = [kept_count(m) for m in masks]
        members = [Member(arm, s) for s in seeds]
        df = metrics_table(self.run_id, 0, members, densities, result.records, wall_s, result.diverged)
        k = df["member"]
        df["param_count"] = [kept[i] for i in k]
        df["mask_seed"] = [-1 if self.source.source_seeds[i] is None else self.source.source_seeds[i] for i in k]
        store.write_level(0, {
            "members.json": json.dumps([{"arm": arm, "seed": s} for s in seeds]).encode(),
            "masks.msgpack": tree_bytes(to_numpy(stack(masks))),
            "final.msgpack": tree_bytes(final),
            "metrics.parquet": parquet_bytes(df),
            "sparsity.parquet": parquet_bytes(sparsity_table(0, members, final["params"], masks, can_prune,
                                                                       structure_of(self.model))),
        })
        if cfg.log.wandb != "disabled":
            sink = WandbSink(cfg.log.wandb, cfg.log.project, cfg.name, self.run_id, flatten(self.hparams()),
                             store.path)
            try:
                sink.log_level(0, engine.num_steps, df.to_dict("records"))
            finally:
                sink.close()

def train_masked(cfg: ExperimentConfig, out: str | Path, mask: str | Path, arm: str = "ticket", *,
                 progress: bool | None = None) -> RunStore:
    """Train every seed of ``cfg`` with the masks of ``mask`` (see the module doc) into ``out``."""
    return MaskedRun(cfg, out, mask, arm, progress=progress).run()
