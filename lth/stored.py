"""One reader for stored runs: a run folder's config, data set, model and level files.

Used by every command that works on a finished run (quantize, export, sensitivity, compact) so a
run folder is opened, checked and turned into arrays in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import registry
from .config import ConfigError, ExperimentConfig, legacy_filled
from .data import load_dataset
from .models import build_model
from .store import (RunStore, StoreError, atomic_write_json, check_fingerprint, check_hparams, load_tree,
                    read_hparams, read_json, read_members_file, read_parquet, stacked_seeds, take_seeds)

PyTree = Any

# the [quant] settings of the experiment that last wrote quant cells into the run: not part of the run id
# (so not in hparams.json), kept beside it so that `lth quantize RUN` without --config starts from them
QUANT_SETTINGS = "quant_settings.json"


def run_config(run_dir: str | Path) -> tuple[ExperimentConfig, dict]:
    """(config, hparams dict) of a run folder; StoreError if it is not one, or if its hparams.json
    does not hash to the folder's run id (edited after its results were made)."""
    path = Path(run_dir)
    if not (path / "hparams.json").is_file():
        raise StoreError(f"{path} is not a run folder (no hparams.json); pass OUT/<run_id>")
    hparams = read_hparams(path / "hparams.json")
    check_hparams(path / "hparams.json", hparams, path.name)  # not edited after its results were made
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    raw = {k: v for k, v in legacy_filled(hparams).items() if k in known and k != "quant"}  # quant: not the run's identity
    return ExperimentConfig.from_dict(raw, str(path / "hparams.json")), hparams


def write_quant_settings(run_dir: str | Path, quant: dict, source: str) -> None:
    """Record ``quant`` (a :meth:`lth.config.QuantConfig.to_dict`) as the run's quant settings; ``source``
    says whose they are (``experiment 'NAME'``)."""
    atomic_write_json(Path(run_dir) / QUANT_SETTINGS, {"quant": quant, "source": source})


def stored_quant_settings(run_dir: str | Path) -> tuple[dict, str] | None:
    """(the run's recorded quant settings as a ``[quant]`` table, whose they are), or None when the run records
    none (written before the record existed, or never quantized); StoreError naming the file when it is
    damaged."""
    path = Path(run_dir) / QUANT_SETTINGS
    if not path.is_file():
        return None
    rec = read_json(path)
    if not (isinstance(rec, dict) and isinstance(rec.get("quant"), dict)):
        raise StoreError(f"{path}: holds no [quant] table (damaged or edited); delete it to use the defaults")
    return rec["quant"], str(rec.get("source", ""))


@dataclass
class Population:
    """Members of one level that share a model: stacked ``[K, ...]`` numpy trees."""

    model: Any
    members: list[tuple[str, int]]  # (arm, seed) per member
    params: PyTree
    batch_stats: PyTree
    masks: PyTree  # bools

    def take(self, idx) -> "Population":
        idx = np.asarray(idx, int)
        sel = lambda t: {k: sel(v) for k, v in t.items()} if isinstance(t, dict) else np.asarray(t)[idx]  # noqa: E731
        return Population(self.model, [self.members[i] for i in idx], sel(self.params), sel(self.batch_stats),
                          sel(self.masks))


@dataclass
class StoredRun:
    """A run folder opened for reading: config, data set, model and per-level files."""

    path: Path
    cfg: ExperimentConfig
    hparams: dict
    data: Any
    model: Any

    @classmethod
    def open(cls, run_dir: str | Path, data=None, model=None) -> "StoredRun":
        """Open ``run_dir``; ``data``/``model`` skip loading them again when the caller has them."""
        cfg, hparams = run_config(run_dir)
        RunStore(Path(run_dir).parent, Path(run_dir).name).finish_swaps()  # a level swap a killed grow left
        source = str(Path(run_dir) / "hparams.json")
        try:  # a stored run never makes lth import code it names (unless the user trusts it: --code)
            if data is None:
                registry.DATASETS.check_from_file(cfg.data.name, "data.name", source)
            if model is None:
                registry.MODELS.check_from_file(cfg.model.name, "model.name", source)
        except registry.RegistryError as e:
            raise ConfigError(str(e)) from None
        data = data if data is not None else load_dataset(cfg.data)
        check_fingerprint(Path(run_dir) / "hparams.json", hparams, data.fingerprint)  # not other data
        model = model if model is not None else build_model(cfg.model, data.num_classes, data.input_shape)
        return cls(Path(run_dir), cfg, hparams, data, model)

    @property
    def run_id(self) -> str:
        return self.hparams.get("run_id", self.path.name)

    @property
    def store(self) -> RunStore:
        return RunStore(self.path.parent, self.path.name)

    def level_dir(self, level: int) -> Path:
        return self.store.level_dir(level)

    def complete_levels(self) -> list[int]:
        store = self.store
        return [int(d.name[6:]) for d in sorted(self.path.glob("level_[0-9][0-9][0-9]"))
                if store.is_complete(int(d.name[6:]))]

    def check_level(self, level: int) -> Path:
        """The folder of a complete, intact level; ConfigError naming why not otherwise."""
        problem = self.store.level_problem(level)
        if problem:
            done = self.complete_levels()
            raise ConfigError(f"level {level} of {self.path} is not usable ({problem}); complete levels: "
                              f"{', '.join(map(str, done)) or 'none'}")
        return self.level_dir(level)

    def metrics(self, level: int):
        return read_parquet(self.check_level(level) / "metrics.parquet")

    def population(self, level: int) -> Population:
        """The level's main population (every arm but small_dense), in stored member order; stability
        copies (``copy`` > 0 in members.json) are left out, so each (arm, seed) appears once."""
        d = self.check_level(level)
        stored = read_members_file(d / "members.json")
        keep = [k for k, m in enumerate(stored) if not m.get("copy", 0)]
        final = load_tree(d / "final.msgpack")
        masks = load_tree(d / "masks.msgpack")
        bool_masks = _map(lambda a: np.asarray(a).astype(bool), masks)
        pop = Population(self.model, [(m["arm"], int(m["seed"])) for m in stored], final["params"],
                         final.get("batch_stats", {}) or {}, bool_masks)
        return pop if len(keep) == len(stored) else pop.take(keep)

    def small_dense(self, level: int) -> Population | None:
        """The level's small-dense baselines (their own, narrower model), or None."""
        d = self.check_level(level)
        if not (d / "small_dense_final.msgpack").is_file():
            return None
        m = self.metrics(level)
        rows = m[m["arm"] == "small_dense"].drop_duplicates("seed").sort_values("member")
        width = float(rows["width"].iloc[0])
        model = build_model(dataclasses.replace(self.cfg.model, width=width), self.data.num_classes,
                            self.data.input_shape)
        final = load_tree(d / "small_dense_final.msgpack")
        ones = _map(lambda a: np.ones(np.shape(a), bool), final["params"])
        return Population(model, [("small_dense", int(s)) for s in rows["seed"]], final["params"],
                          final.get("batch_stats", {}) or {}, ones)

    def weights_file(self, name: str, seeds) -> dict:
        """A run-level weights file (``init.msgpack``, ``rewind.msgpack``) as ``{"params", "batch_stats"}``
        stacked over ``seeds`` in that order (looked up by value; see :func:`seed_weights`)."""
        return seed_weights(self.store, name, seeds, self.hparams.get("seeds"))[0]

    def stacked(self, name: str) -> tuple[dict, list[int]]:
        """A run-level weights file stacked over seeds: (``{"params", "batch_stats"}``, the seed of each entry)."""
        return seed_weights(self.store, name, None, self.hparams.get("seeds"))

    def calib_x(self, batches: int) -> np.ndarray:
        """``batches`` training batches (a fixed random subset of the train split)."""
        n = min(len(self.data.x_train), batches * self.cfg.train.batch_size)
        idx = np.sort(np.random.default_rng(0).permutation(len(self.data.x_train))[:n])
        return np.asarray(self.data.x_train[idx])


def seed_weights(store: RunStore, name: str, seeds=None, fallback=None) -> tuple[dict, list[int]]:
    """(``{"params", "batch_stats"}`` stacked over seeds, those seeds) of a run-level weights file
    (``init.msgpack``, ``rewind.msgpack``), verified against ``MANIFEST.json`` and looked up by its own
    seeds record, never by position: ``seeds`` (default: every seed it holds, in its order) picks and
    orders the entries. ``fallback``: the run's hparams seeds, for files written before the record.
    StoreError naming the file when it is missing, damaged or lacks one of ``seeds``."""
    path = store.path / name
    tree, held = stacked_seeds(store.read_tree(name), fallback, str(path))  # verified
    if not isinstance(tree.get("params"), dict):
        raise StoreError(f"{path}: holds no params")
    out = {"params": tree["params"], "batch_stats": tree.get("batch_stats", {}) or {}}
    if seeds is None:
        return out, held
    seeds = [int(s) for s in seeds]
    return take_seeds(out, held, seeds, str(path)), seeds


def _map(fn, tree):
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)
