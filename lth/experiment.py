"""A Python API a notebook can drive: load an experiment, vary it, run it, get the tidy DataFrame.

    >>> import lth
    >>> exp = lth.Experiment.from_toml("experiments/quickstart.toml").set(**{"prune.levels": 3})
    >>> df = exp.run("runs")            # trains (or resumes) levels 0..3, then the [quant] stage
    >>> from analysis import summarize    # early stop selected on val, test accuracy read there
    >>> summarize(df)[["arm", "level", "density", "early_stop_test_accuracy_mean"]]

``lth lottery`` and ``lth train`` run through :meth:`Experiment.execute`, so the CLI and a notebook
take the same code path. An :class:`Experiment` is immutable: :meth:`Experiment.set` returns a new,
validated one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .config import SECTIONS, ConfigError, ExperimentConfig, load_experiment

if TYPE_CHECKING:
    import pandas as pd

    from .store import RunStore


def _plain(value: Any, where: str, key: str = "") -> Any:
    """A deep copy of ``value`` with numpy scalars and arrays as Python numbers and lists (tuples as
    lists); ConfigError (one line, naming the key) for a value that no setting can hold."""
    if isinstance(value, dict):
        return {str(k): _plain(v, where, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where, key) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # np.int64(3), np.array([0, 1])
        return _plain(value.tolist(), where, key)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"{where}: {key or 'config'} = {value!r} is not allowed; expected a number, string, true/false, "
                      "list or table")


class Experiment:
    """One fully specified experiment (an :class:`~lth.config.ExperimentConfig`) and how to run it."""

    def __init__(self, config: ExperimentConfig):
        if not isinstance(config, ExperimentConfig):
            raise TypeError(f"Experiment takes an ExperimentConfig, got {type(config).__name__}")
        self._config = config

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> "Experiment":
        """Load an experiment file (its ``[sweep]`` table is ignored) with ``--set``-style
        ``overrides`` (``"train.lr=0.01"``). ConfigError (one line) for a bad file or setting."""
        return cls(load_experiment(path, list(overrides)))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "dict") -> "Experiment":
        """From a raw dict shaped like the TOML file (``{"prune": {"levels": 3}, "seeds": [0, 1]}``);
        missing keys take their defaults. ConfigError naming ``where`` and the key for a bad value."""
        return cls(ExperimentConfig.from_dict(_plain(d, where), where))

    def set(self, **settings: Any) -> "Experiment":
        """A new Experiment with ``settings`` changed: dotted keys for section fields
        (``.set(**{"prune.levels": 3, "train.lr": 0.01}, seeds=[0, 1])``), or a section's table
        (``.set(prune={"levels": 3})``), which changes only the keys it names, as ``--set`` does;
        ``None`` restores a key's default (``"quant": None`` drops the quant stage). Numpy scalars
        and arrays count as numbers and lists. Validated like a file: ConfigError."""
        raw = self._config.to_dict()
        for key, value in settings.items():
            path = key.split(".")
            if len(path) > 2 or (len(path) == 2 and path[0] not in SECTIONS):
                raise ConfigError(f"Experiment.set: key {key!r} is not 'setting' or 'section.setting'; sections: "
                                  f"{', '.join(SECTIONS)}")
            if len(path) == 1:
                if value is None:
                    raw.pop(key, None)
                elif key in SECTIONS and isinstance(value, dict) and isinstance(raw.get(key), dict):
                    # a section's table changes the keys it names, as --set does; the others are kept
                    raw[key] = {**raw[key], **value}
                    for k in [k for k, v in value.items() if v is None]:
                        raw[key].pop(k)
                else:
                    raw[key] = value
                continue
            section, name = path
            table = raw.get(section)
            if table is None:
                table = raw[section] = {}
            if value is None:
                table.pop(name, None)
            else:
                table[name] = value
        where = "Experiment.set(" + ", ".join(f"{k}={v!r}" for k, v in settings.items()) + ")"
        return Experiment.from_dict(raw, where)

    # ------------------------------------------------------------------ identity
    @property
    def config(self) -> ExperimentConfig:
        """The validated settings (frozen dataclasses; ``config.to_dict()`` for a plain dict)."""
        return self._config

    @property
    def run_id(self) -> str:
        """12 hex digits hashing the settings that change results (not ``quant.*``, ``log.*``)."""
        return self._config.run_id

    def to_dict(self) -> dict[str, Any]:
        return self._config.to_dict()

    def __repr__(self) -> str:
        c = self._config
        return (f"Experiment({c.name!r}, run_id={self.run_id}, model={c.model.name}, data={c.data.name}, "
                f"levels={c.prune.levels}, seeds={list(c.seeds)}, arms={list(c.arms)}, "
                f"quant={'yes' if c.quant is not None else 'no'})")

    def __eq__(self, other) -> bool:
        return isinstance(other, Experiment) and other._config == self._config

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ running
    def status(self, out: str | Path = "runs") -> dict[str, int]:
        """What running it into ``out`` still needs, reading file names only (no data, no compiling):
        ``{"levels": levels holding every wanted member, "of": prune.levels + 1, "cells": pending quant
        cells, "stability": levels with pending stability paths, "new_levels": levels not stored at all,
        "seeds"/"arms": seeds and arms the stored levels lack}`` (:func:`lth.pipeline.run_status`)."""
        from .pipeline import run_status
        return run_status(self._config, out)

    def execute(self, out: str | Path = "runs", *, progress: bool | None = None,
                log: Callable[[str], None] | None = None) -> "RunStore":
        """Run or resume every level, then each level's quant cells, into ``out/<run_id>``; returns
        the run's store. A finished run returns at once. RunBusyError if another process runs it."""
        from .pipeline import run_experiment
        return run_experiment(self._config, out, progress=progress, log=log)

    def run(self, out: str | Path = "runs", *, progress: bool | None = False,
            log: Callable[[str], None] | None = None) -> "pd.DataFrame":
        """:meth:`execute`, then :meth:`results`: the tidy DataFrame of this run."""
        self.execute(out, progress=progress, log=log)
        return self.results(out)

    def results(self, out: str | Path = "runs") -> "pd.DataFrame":
        """This experiment's rows of :func:`analysis.load_runs` (completed levels only): float rows, one
        per (arm, seed, level, step, split) with ``bits = 32``, ``method = "float"``, accuracy, loss,
        density; and quantized rows, one per (quant cell, seed) with ``bits``, ``method`` (ptq/qat),
        ``size_bytes``. Every setting is a column with its dotted name (``prune.rate``).

        Only the members this experiment asks for (its seeds, arms and levels: :func:`requested_rows`);
        a store grown by another experiment of the same run id keeps more, which
        ``analysis.load_runs(out, run_ids=[exp.run_id])`` reads."""
        from analysis import load_runs
        return requested_rows(load_runs(out, run_ids=[self.run_id]), self._config)


def requested_rows(df: "pd.DataFrame", cfg: ExperimentConfig) -> "pd.DataFrame":
    """The rows of ``df`` (a :func:`analysis.load_runs` table) of the members ``cfg`` asks for: levels
    0..prune.levels, its seeds, and per level its arms (level 0: the dense ``ticket``; small-dense where
    asked). A run's store may hold more (another experiment of the same run id grew it)."""
    from .lottery.runner import wanted_members

    wanted = {(level, m.arm, m.seed) for level in range(cfg.prune.levels + 1)
              for ms in wanted_members(cfg, level) for m in ms if m.copy == 0}
    keys = zip(df["level"].astype(int), df["arm"].astype(str), df["seed"].astype(int))
    return df[[k in wanted for k in keys]].reset_index(drop=True)
