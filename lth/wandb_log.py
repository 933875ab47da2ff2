"""Weights & Biases sink: one W&B run per (run, arm, seed). Never fatal.

The store is the source of truth and is written first; every W&B call here is wrapped so that a
W&B failure (no account, no network, a broken install) becomes one warning and logging stops.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


class WandbSink:
    """Logs each level's metric rows to one W&B run per (arm, seed), resuming across processes."""

    def __init__(self, mode: str, project: str, group: str, run_id: str, config: dict, directory: Path):
        self.mode, self.project, self.group = mode, project, group
        self.run_id, self.config, self.dir = run_id, config, Path(directory)
        self.runs: dict[tuple[str, int], Any] = {}
        self.failed = mode == "disabled"

    def _fail(self, e: BaseException) -> None:
        warnings.warn(f"W&B logging disabled after an error ({type(e).__name__}: {e}); "
                      f"results are still written to the store", RuntimeWarning, stacklevel=3)
        self.failed = True

    def _run(self, arm: str, seed: int):
        key = (arm, seed)
        if key not in self.runs:
            import wandb
            self.dir.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.runs[key] = wandb.init(
                mode=self.mode, project=self.project, group=self.group, job_type=arm,
                name=f"{self.group}-{arm}-s{seed}", id=f"{self.run_id}-{arm}-s{seed}", resume="allow",
                dir=str(self.dir), config={**self.config, "arm": arm, "seed": seed, "run_id": self.run_id},
                reinit="create_new", settings=wandb.Settings(silent=True, console="off"))
        return self.runs[key]

    def log_level(self, level: int, steps_per_level: int, rows: list[dict]) -> None:
        """rows: tidy metric rows of one level (arm, seed, step, split, loss, accuracy, density)."""
        if self.failed:
            return
        try:
            by_member: dict[tuple[str, int], dict[int, dict]] = {}
            for r in rows:
                d = by_member.setdefault((r["arm"], r["seed"]), {}).setdefault(r["step"], {
                    "level": level, "density": r["density"], "step_in_level": r["step"]})
                d[f"{r['split']}/loss"] = r["loss"]
                d[f"{r['split']}/accuracy"] = r["accuracy"]
            for (arm, seed), steps in by_member.items():
                run = self._run(arm, seed)
                for step, metrics in sorted(steps.items()):
                    run.log(metrics, step=level * steps_per_level + step)
                last = steps[max(steps)]
                run.summary[f"level_{level:03d}/test_accuracy"] = last.get("test/accuracy")
                run.summary[f"level_{level:03d}/density"] = last["density"]
        except Exception as e:  # noqa: BLE001 - W&B must never kill the experiment
            self._fail(e)

    def close(self) -> None:
        for run in self.runs.values():
            try:
                run.finish()
            except Exception as e:  # noqa: BLE001
                self._fail(e)
        self.runs.clear()
