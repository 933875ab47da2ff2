"""Sweeps: the grid of an experiment file's ``[sweep]`` table, run locally or on a Ray cluster.

``[sweep]`` maps dotted settings to lists of values (``"prune.rate" = [0.2, 0.4]`` or a nested
``[sweep.prune]`` table); the sweep is their cartesian product, each point one run (all its seeds
and arms train as one population, and runs that share data, model, training and rewinding train
each level together as one population: :func:`groups_of`). Finished runs are skipped; a run that another process is
computing (its store lock is held) is skipped too, so several sweep processes can share a store.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import ConfigError, ExperimentConfig, apply_overrides, load_raw, parse_override
from .lottery.groups import population_key
from .pipeline import run_experiments, run_status, stability_pending
from .store import prepare_root
from .wandb_log import flatten


@dataclass(frozen=True)
class SweepPoint:
    overrides: tuple[str, ...]  # e.g. ("prune.rate=0.2", "rewind.step=0")
    cfg: ExperimentConfig

    @property
    def run_id(self) -> str:
        return self.cfg.run_id

    @property
    def key(self) -> tuple:
        """Identity of the point's results: its training run, the members it wants (seeds, arms,
        levels: not part of the run id) and its quant stage."""
        c = self.cfg
        return (c.run_id, c.seeds, c.arms, c.prune.levels, None if c.quant is None else c.quant.to_json_key())

    @property
    def label(self) -> str:
        return " ".join(self.overrides) or "(base)"


def sweep_axes(path: str | Path) -> dict[str, list]:
    """The ``[sweep]`` table as {dotted key: list of values}; ConfigError on a malformed table."""
    raw = load_raw(path)
    table = raw.get("sweep", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [sweep] must be a table of dotted settings to lists of values")
    axes = flatten(table)
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: sweep.{key} = {values!r} is not allowed; expected a non-empty list "
                              "of values")
    return axes


def _toml_value(v: Any) -> str:
    """``v`` (a value read from TOML: scalar, list or table) as a TOML value, for ``--set``-style
    overrides: a table is an inline table (``{"dense_0" = 0.3}``), not JSON."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return json.dumps(v)  # JSON strings, numbers and booleans are valid TOML values


def expand(path: str | Path, overrides: Iterable[str] = ()) -> list[SweepPoint]:
    """Every run of the sweep, validated before any work (a bad grid value fails here)."""
    raw = load_raw(path)
    raw.pop("sweep", None)
    axes = sweep_axes(path)
    for text in overrides:  # a --set of a swept key replaces that axis: every run takes its value
        keys, value = parse_override(text)
        if ".".join(keys) in axes:
            axes[".".join(keys)] = [value]
    base = apply_overrides(raw, list(overrides))
    points, seen = [], set()
    for combo in itertools.product(*axes.values()) if axes else [()]:
        sets = tuple(f"{k}={_toml_value(v)}" for k, v in zip(axes, combo))
        where = f"{path} with sweep point {' '.join(sets)}" if sets else str(path)
        cfg = ExperimentConfig.from_dict(apply_overrides(base, list(sets)), where)
        point = SweepPoint(sets, cfg)
        if point.key not in seen:  # two grid points that mean the same run (and quant stage) are one
            seen.add(point.key)
            points.append(point)
    return points


@dataclass
class Outcome:
    run_id: str
    label: str
    status: str  # trained | complete | busy | failed
    wall_s: float
    message: str = ""
    compiles: dict | None = None  # what a worker process compiled for the point's group (CompileCount.to_json)


def groups_of(points: list[SweepPoint], max_runs: int = 8) -> list[list[int]]:
    """Indices of the points that train together, in grid order.

    Points with equal :func:`lth.lottery.groups.population_key` (same data, model, training and
    rewinding) form one group, cut into pieces of at most ``max_runs`` runs (memory: a group's
    population holds every member of its runs); ``max_runs = 1`` trains every run alone.
    """
    if max_runs < 1:
        raise ConfigError(f"--group {max_runs} is not allowed; expected an integer >= 1")
    # points of one training run (they differ only in quant.*, seeds, arms or levels) always go together:
    # the run trains once, with the union of their members (lth.pipeline.merged_configs)
    runs: dict[str, list[int]] = {}
    for i, p in enumerate(points):
        runs.setdefault(p.run_id, []).append(i)
    by_key: dict[str, list[list[int]]] = {}
    alone: list[list[int]] = []
    for run in runs.values():
        key = population_key(points[run[0]].cfg)
        if key is None or max_runs == 1:
            alone.append(run)
        else:
            by_key.setdefault(key, []).append(run)
    groups = [sum(g[j:j + max_runs], []) for g in by_key.values() for j in range(0, len(g), max_runs)] + alone
    return sorted(groups, key=lambda g: g[0])


def run_group_point(cfg_jsons: list[str], out: str, progress: bool = False) -> list[dict]:
    """Run one group of sweep points in this process (the unit of work of every executor)."""
    from .compiles import counting

    cfgs = [ExperimentConfig.from_json(c) for c in cfg_jsons]
    t0 = time.time()
    with counting() as count:
        status = run_experiments(cfgs, out, progress=progress)
    wall = time.time() - t0
    rows = []
    for cfg in cfgs:
        st = status[cfg.run_id]
        kind, _, message = st.partition(": ")
        rows.append({"run_id": cfg.run_id, "status": kind, "wall_s": wall if kind in ("trained", "quantized") else 0.0,
                     "message": message})
    if rows:  # the group's compiles, once (a worker process's count for the sweep's compiles: line)
        rows[0]["compiles"] = count.to_json()
    return rows


def _run_group_safe(cfg_jsons: list[str], out: str) -> list[dict]:
    try:
        return run_group_point(cfg_jsons, out)
    except Exception as e:  # noqa: BLE001 - one failed group must not stop the sweep
        if len(cfg_jsons) > 1:  # retry its runs alone, so one bad run does not fail its neighbours
            rows = [r for c in cfg_jsons for r in _run_group_safe([c], out)]
            for r in rows:
                r["message"] = r["message"] or (f"trained alone: its group of {len(cfg_jsons)} failed "
                                                f"({type(e).__name__}: {e})")
            return rows
        cfg = ExperimentConfig.from_json(cfg_jsons[0])
        return [{"run_id": cfg.run_id, "status": "failed", "wall_s": 0.0, "message": f"{type(e).__name__}: {e}"}]


def run_sweep(points: list[SweepPoint], out: str | Path, *, executor: str = "local", workers: int = 1,
              address: str | None = None, group: int = 8,
              on_done: Callable[[Outcome, int, int], None] | None = None) -> list[Outcome]:
    """Run every point not yet finished; returns one Outcome per point, in grid order.

    Points that can share a population train together, ``group`` runs at most (:func:`groups_of`);
    a group's runs report the group's wall time.
    """
    out = str(prepare_root(out))
    groups = groups_of(points, group)
    results: dict[int, Outcome] = {}

    in_process = executor == "local" and workers <= 1  # counted by this process's own counter

    def done(idx: list[int], rows: list[dict]) -> None:
        for i, r in zip(idx, rows):
            results[i] = Outcome(r["run_id"], points[i].label, r["status"], r["wall_s"], r.get("message", ""),
                                 None if in_process else r.get("compiles"))
            if on_done is not None:
                on_done(results[i], len(results), len(points))

    def payload(idx):
        return [points[i].cfg.to_json() for i in idx]

    if executor == "local" and workers <= 1:
        for idx in groups:
            done(idx, _run_group_safe(payload(idx), out))
    elif executor == "local":
        import concurrent.futures as cf
        import multiprocessing as mp

        # spawn, not fork: a forked JAX runtime can deadlock
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_group_safe, payload(idx), out): idx for idx in groups}
            for f in cf.as_completed(futures):
                done(futures[f], f.result())
    elif executor == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        task = ray.remote(num_cpus=1)(_run_group_safe)
        refs = {task.remote(payload(idx), out): idx for idx in groups}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                done(refs[ref], ray.get(ref))
    else:
        raise ConfigError(f"--executor {executor!r} is not allowed; expected 'local' or 'ray'")
    return [results[i] for i in range(len(points))]


def wandb_sweep_config(path: str | Path, points: list[SweepPoint], out: str) -> dict:
    """A W&B grid-sweep config whose program is ``lth``: each agent call runs one grid point."""
    axes = sweep_axes(path)
    name = points[0].cfg.name if points else Path(path).stem
    return {
        "name": name,
        "program": "lth",
        "method": "grid",
        "parameters": {k: {"values": v} for k, v in axes.items()},
        "command": ["lth", "lottery", str(path), "--out", out, "--no-progress", "${args_no_hyphens}"],
    }


def status_of(points: list[SweepPoint], out: str | Path) -> list[tuple[SweepPoint, str]]:
    """(point, what it still needs) for a dry run: 'complete', 'quantize only (N cells)', 'train
    (k/n levels done)', 'grow: 2 levels, 1 seed, 1 arm to add (3/5 levels done)' (a stored run that
    gains members) or 'new', each training status followed by its quant cells, if any."""
    rows = []
    for p in points:
        s = run_status(p.cfg, out)
        cells = f" + quantize {s['cells']} cells" if s["cells"] else ""
        stab = s.get("stability", 0)
        if s["levels"] == s["of"] and stab and not s["cells"]:
            rows.append((p, f"stability paths only ({stab} levels)"))
        elif s["levels"] == s["of"]:
            rows.append((p, f"quantize only ({s['cells']} cells)" if s["cells"] else "complete"))
        elif s["seeds"] or s["arms"]:
            add = [f"{n} {what}{'s' if n > 1 else ''}" for n, what in
                   ((s["new_levels"], "level"), (s["seeds"], "seed"), (s["arms"], "arm")) if n]
            rows.append((p, f"grow: {', '.join(add)} to add ({s['levels']}/{s['of']} levels done){cells}"))
        elif s["new_levels"] < s["of"]:
            rows.append((p, f"train ({s['levels']}/{s['of']} levels done){cells}"))
        else:
            rows.append((p, f"new: train {s['of']} levels{cells}"))
    return rows


def run_stage(cfg: ExperimentConfig, out: str | Path, start: int = 0) -> tuple[int, str | None]:
    """What the pipeline of ``cfg`` in ``out`` computes next, in its order (a level's training, then
    that level's stability paths, then its quant cells): ``(level, "train level L/N" | "stability
    level L" | "quant level L (k cells)")``, or ``(levels + 1, None)`` when nothing is left. Levels
    before ``start`` are taken as done (a caller that polls remembers where it got). Reads file names,
    members files and checksums of the level it stops at only: no data, no compiling."""
    from .lottery.runner import stored_members, wanted_members
    from .quant.stage import pending, quant_levels
    from .store import RunStore

    store = RunStore(out, cfg.run_id)
    last = cfg.prune.levels
    for level in range(start, last + 1):
        d = store.level_dir(level)
        if not (d / "COMPLETE").is_file():
            return level, f"train level {level}/{last}"
        have = stored_members(d)
        if any(m not in held for want, held in zip(wanted_members(cfg, level), have) for m in want):
            return level, f"train level {level}/{last}"
        if stability_pending(cfg, store.path, [level]):
            return level, f"stability level {level}"
        if cfg.quant is not None and level in quant_levels(cfg, cfg.quant):
            cells = len(pending(cfg, store.path, cfg.quant, [level]))
            if cells:
                return level, f"quant level {level} ({cells} cell{'s' if cells > 1 else ''})"
    return last + 1, None


def stages_text(stages: Iterable[str]) -> str:
    """The stages running now, for a progress bar: each distinct one once, with how many runs are in it
    (``"train level 2/5 in 3 runs, quant level 1 (4 cells)"``); ``""`` for none."""
    counts: dict[str, int] = {}
    for st in stages:
        counts[st] = counts.get(st, 0) + 1
    return ", ".join(st + (f" in {n} runs" if n > 1 else "") for st, n in counts.items())
