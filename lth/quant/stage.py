"""The quantization stage of an experiment: the store-facing part of :mod:`lth.quant`.

A **cell** is one quantization setting (bits, scheme, granularity, calibration, activation bits,
method, and the options its method reads) applied to every seed of one arm at one level. Its id
is ``sha256(run id, level, arm, setting)``, so:

- changing only ``quant.*`` never retrains anything (the training run id does not see it), and
  a setting already computed (by this experiment, another sweep point or ``lth quantize``) is
  never computed again;
- a cell is written atomically: ``level_NNN/quant/<cell>.parquet`` first, then
  ``<cell>.json`` with its sha256 and setting; a cell counts as done only when the JSON exists
  and the table matches its checksum (a killed run recomputes exactly the missing cells).

Every member that gets QAT also gets its float control, ``float_ft`` (rows with ``method =
"float_ft"``, ``bits = 32``): the same member fine-tuned in float with exactly QAT's schedule (start
point, steps, lr, optimizer, batch order, mask), trained by QAT's own compiled program with
quantization switched off (:func:`lth.quant.qat.float_ft`), so quantized models are compared with a
float network trained exactly as much. Its cell is keyed by (run id, level, arm, QAT's schedule): one
per arm for every QAT bit width and scheme.

All pending arms of a level that share a model (every arm but ``small_dense``, whose narrower
model is a population of its own) are quantized together: weight calibration, activation ranges,
evaluation and QAT run once over the stacked population (one compiled program per step kind);
``batched=False`` runs one member at a time (the same numbers, for the speed comparison).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
import pandas as pd

from ..config import (GPTQ_METHODS, ConfigError, ExperimentConfig, QuantConfig, check_gptq_settings, check_quant,
                      quant_numerics_version, stale_numerics)
from ..data import is_text_data
from ..lottery.arms import reinit_weights
from ..models import structure_of
from ..prune.baselines import pad_params, pads_exactly, unpad_params
from ..prune.masks import density, prunable
from ..store import (StoreError, atomic_write_bytes, atomic_write_json, failpoint, marked_file_problem,
                     parquet_bytes, read_json)
from ..stored import QUANT_SETTINGS, Population, StoredRun, stored_quant_settings, write_quant_settings
from ..train import (init_population, init_variables, is_language_model, lm_metrics, make_schedule, member_batch_size, stack,
                     steps_per_epoch, total_steps, unstack)
from ..trees import kept_count, seed_keys
from .export import float_size_report, nm_of, size_report, write_export
from .intinfer import from_quantized
from .numerics import QuantSpec
from .gptq_net import check_gptq_model, gptq_population
from .ptq import QuantizedTicket, layer_program, ptq_population
from .qat import float_ft, qat
from .wiring import Evaluator, fake_quant_predict, get_layer

QUANT_DIR = "quant"

# one row per (cell, seed); a cell holds every seed of one arm
COLUMNS = ["run_id", "cell", "level", "arm", "seed", "density", "param_count", "bits", "method", "scheme",
           "granularity", "calibration", "act_bits", "act_scheme", "accuracy", "val_accuracy", "float_accuracy",
           "float_val_accuracy", "size_bytes", "compression", "float_size_bytes", "fp32_dense_bytes",
           "fp16_dense_bytes", "int8_dense_bytes", "bias_correction", "cle", "learned_scale", "qat_start",
           "qat_steps", "qat_lr", "retry", "calibration_requested", "calibration_tried", "wall_s", "group_size",
           "act_order"] + [
    # the mean next-token loss over the same fixed val/test windows as training's evaluation, and for a
    # language model (text data) its perplexity and bits per byte (lower is better; NaN for classifiers)
    "loss", "val_loss", "perplexity", "val_perplexity", "bits_per_byte", "val_bits_per_byte",
    "float_bits_per_byte", "float_val_bits_per_byte"]
LM_COLUMNS = COLUMNS[COLUMNS.index("loss"):]


# ============================================================================ settings and cells

FLOAT_FT = "float_ft"  # QAT's float control: the method of its rows (bits = 32)
FT_OPTIONS = ("qat_start", "qat_steps", "qat_lr")  # what a float_ft cell depends on besides its member


@dataclass(frozen=True)
class Setting:
    """One quantization setting: the quantizer (``spec``), the method and the options it reads.

    The ``float_ft`` setting (QAT's float control) quantizes nothing: its ``spec`` is None and its
    options are QAT's schedule only (:data:`FT_OPTIONS`), so every QAT setting of a level shares it."""

    spec: QuantSpec | None
    method: str
    options: tuple[tuple[str, Any], ...]

    def option(self, name: str):
        return dict(self.options)[name]

    def key(self, version: int | None = None) -> dict:
        """What the cell's id hashes. ``version``: of the method's numerics (default: the current one,
        :data:`lth.config.QUANT_NUMERICS`), left out at 1, so cells written before versions existed keep
        their ids; a cell computed with older numerics has another id and is recomputed, not reused."""
        s = self.spec
        version = quant_numerics_version(self.method, dict(self.options)) if version is None else version
        numerics = {"numerics_version": version} if version > 1 else {}
        if s is None:
            return {"bits": 32, "method": self.method, **dict(self.options), **numerics}
        return {"bits": s.bits, "scheme": s.scheme_name, "granularity": s.granularity, "calibration": s.calibration,
                "act_bits": s.act_bits or 0, "act_scheme": s.act_scheme if s.act_bits else "",
                "percentile": s.percentile, "method": self.method, **dict(self.options), **numerics}

    @property
    def label(self) -> str:
        s = self.spec
        if s is None:
            return f"{self.method} (float, QAT's schedule)"
        if self.method in GPTQ_METHODS:
            g, o = self.option("group_size"), self.option("act_order")
            d = f" density {self.option('joint_density')}" if self.method == "sparsegpt_gptq" else ""
            return f"{self.method}{d} {s.bits}-bit {s.scheme_name}/{f'group{g}' if g else 'channel'}{' act-order' if o else ''}"
        return f"{self.method} {s.bits}-bit {s.scheme_name}/{s.granularity}/{s.calibration}"


def settings_of(qc: QuantConfig, lm: bool = False) -> list[Setting]:
    """Every setting ``qc`` sweeps (bits x scheme x granularity x calibration x method). ``lm``: the run
    is a language model, whose PTQ retry judges val bits per byte (option ``retry_judge``)."""
    out = []
    for bits in qc.bits:
        for scheme in qc.scheme:
            if bits == 1 and scheme != qc.scheme[0]:
                continue  # binary has no scheme
            for gran in qc.granularity:
                for cal in (qc.calibration[:1] if qc.retry else qc.calibration):
                    spec = QuantSpec(bits, scheme, gran, cal, qc.act_bits if qc.activations else None,
                                     qc.act_scheme, None, qc.percentile)
                    for method in qc.method:
                        if method in GPTQ_METHODS:
                            continue  # its own grid: one setting per (bits, scheme), below
                        if method == "ptq":
                            opts = {"calib_batches": qc.calib_batches, "bias_correction": qc.bias_correction,
                                    "cle": qc.cle, "retry": qc.retry}
                            if qc.retry:
                                opts.update(retry_calibrations=",".join(qc.calibration), tolerance=qc.tolerance)
                                if lm:  # (a cell of another id than one chosen by token accuracy)
                                    opts.update(retry_judge="val_bits_per_byte")
                        else:
                            opts = {"calib_batches": qc.calib_batches, "learned_scale": qc.learned_scale,
                                    "qat_steps": qc.qat_steps, "qat_lr": qc.qat_lr, "qat_start": qc.qat_start}
                        out.append(Setting(spec, method, tuple(sorted(opts.items()))))
            for method in qc.method:
                if method in GPTQ_METHODS:
                    out.append(gptq_setting(qc, bits, scheme, method))
    if "qat" in qc.method:  # every member that gets QAT gets its float control
        out.append(float_ft_setting(qc))
    return out


GPTQ_OPTIONS = ("calib_batches", "group_size", "act_order", "gptq_damp")  # what a gptq cell depends on


def gptq_setting(qc: QuantConfig, bits: int, scheme: str, method: str = "gptq") -> Setting:
    """The ``gptq`` setting of ``bits`` and ``scheme``: GPTQ fits its own min-max grid (per channel, or per
    ``quant.group_size`` inputs), so ``quant.granularity`` and ``quant.calibration`` do not apply (its
    activations are calibrated min-max, as PTQ's default). Keyed by :data:`GPTQ_OPTIONS` besides."""
    spec = QuantSpec(bits, scheme, "channel", "minmax", qc.act_bits if qc.activations else None, qc.act_scheme,
                     None, qc.percentile)
    names = GPTQ_OPTIONS + (("joint_density",) if method == "sparsegpt_gptq" else ())
    return Setting(spec, method, tuple(sorted((k, getattr(qc, k)) for k in names)))


def float_ft_setting(qc: QuantConfig) -> Setting:
    """The ``float_ft`` setting of ``qc``: keyed by QAT's schedule (start, steps, lr) only."""
    return Setting(None, FLOAT_FT, tuple(sorted((k, getattr(qc, k)) for k in FT_OPTIONS)))


def program_spec(qc: QuantConfig) -> QuantSpec:
    """The spec whose QAT program trains the float control (the first QAT setting's): quantization is
    switched off there, so the spec changes no number, only which compiled program runs."""
    return next(s.spec for s in settings_of(qc) if s.method == "qat")


def cell_id(run_id: str, level: int, arm: str, setting: Setting) -> str:
    return cell_id_of(run_id, level, arm, setting.key())


def stale_cell_ids(run_id: str, level: int, arm: str, setting: Setting) -> list[str]:
    """The ids the cell of ``setting`` had under older numerics versions of its method (cells the current
    one replaces: they are never read as current)."""
    current = quant_numerics_version(setting.method, dict(setting.options))
    return [cell_id_of(run_id, level, arm, setting.key(v)) for v in range(1, current)]


def cell_id_of(run_id: str, level: int, arm: str, key: dict) -> str:
    """The id of a cell from its setting's key (as recorded in the cell's marker)."""
    blob = json.dumps({"run_id": run_id, "level": int(level), "arm": arm, **key}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def quant_levels(cfg: ExperimentConfig, qc: QuantConfig) -> list[int]:
    last = cfg.prune.levels
    if qc.levels == "all":
        return list(range(last + 1))
    if qc.levels == "last":
        return [last]
    return sorted(int(x) for x in qc.levels if x <= last)


def quant_arms(cfg: ExperimentConfig, qc: QuantConfig, level: int) -> list[str]:
    """Arms of ``level`` the stage quantizes (level 0 is the dense network: the ticket arm)."""
    arms = ["ticket"] if level == 0 else list(cfg.arms)
    return [a for a in arms if qc.arms is None or a in qc.arms]


def cell_problem(level_dir: Path, cid: str, seeds: Iterable[int] | None = None) -> str | None:
    """None when the cell is done and intact (and holds a row for each of ``seeds``); else why not."""
    qdir = Path(level_dir) / QUANT_DIR
    problem = marked_file_problem(qdir / f"{cid}.parquet", qdir / f"{cid}.json")
    if problem is None and seeds is not None:
        try:
            have = cell_seeds(level_dir, cid)
        except StoreError as e:  # a marker with malformed entries: the cell is recomputed
            return str(e)
        lack = [int(s) for s in seeds if int(s) not in have]
        if lack:
            return f"cell {cid} covers seeds {have}, not {lack}"
    return problem


def cell_seeds(level_dir: Path, cid: str) -> list[int]:
    """The seeds an intact cell holds rows for: its marker's ``seeds`` (cells written before runs
    could grow record none: then its table's)."""
    qdir = Path(level_dir) / QUANT_DIR
    meta = read_json(qdir / f"{cid}.json")
    if isinstance(meta.get("seeds"), list):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in meta["seeds"]):
            raise StoreError(f"{qdir / f'{cid}.json'}: its seeds {meta['seeds']!r} are not integers (the marker is "
                             "damaged or was edited)")
        return [int(x) for x in meta["seeds"]]
    return [int(x) for x in pd.read_parquet(qdir / f"{cid}.parquet", columns=["seed"])["seed"]]


@dataclass(frozen=True)
class Cell:
    level: int
    arm: str
    setting: Setting
    id: str


def cells(cfg: ExperimentConfig, qc: QuantConfig, levels: Iterable[int] | None = None) -> list[Cell]:
    """Every cell of the stage ``qc`` of run ``cfg`` (at ``levels``, default ``quant.levels``)."""
    run_id = cfg.run_id
    levels = quant_levels(cfg, qc) if levels is None else list(levels)
    return [Cell(level, arm, s, cell_id(run_id, level, arm, s))
            for level in levels for arm in quant_arms(cfg, qc, level) for s in settings_of(qc, is_text_data(cfg.data.name))]


def pending(cfg: ExperimentConfig, run_dir: str | Path, qc: QuantConfig | None = None,
            levels: Iterable[int] | None = None) -> list[Cell]:
    """The cells of the stage not yet done in ``run_dir`` for every seed of ``cfg`` (a cell over fewer
    seeds, from before the run grew, is pending: only its missing seeds are computed). Reads no data,
    compiles nothing."""
    qc = qc or cfg.quant
    if qc is None:
        return []
    run_dir = Path(run_dir)
    return [c for c in cells(cfg, qc, levels) if cell_problem(run_dir / f"level_{c.level:03d}", c.id, cfg.seeds)]


def read_cells(level_dir: Path) -> pd.DataFrame:
    """Every intact cell of a level folder, as one table (a damaged cell is left out, and one computed with
    older numerics than its method's current ones: :func:`lth.config.stale_numerics`)."""
    frames = []
    level_dir = Path(level_dir)
    qdir = level_dir / QUANT_DIR
    for meta in sorted(qdir.glob("*.json")) if qdir.is_dir() else []:
        if cell_problem(level_dir, meta.stem) is None and not stale_numerics(read_json(meta).get("setting")):
            frames.append(pd.read_parquet(qdir / f"{meta.stem}.parquet"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def write_cell(level_dir: Path, cell: Cell, run_id: str, rows: pd.DataFrame) -> None:
    """Write a cell's table, then its marker (sha256, the seeds it covers, the setting) last.
    A cell that grows is rewritten whole: its stored rows first (the same values), the new ones after."""
    qdir = Path(level_dir) / QUANT_DIR
    rows = rows[COLUMNS].reset_index(drop=True)
    data = parquet_bytes(rows)
    atomic_write_bytes(qdir / f"{cell.id}.parquet", data)
    failpoint(f"quant-cell:{cell.level}:{cell.arm}")  # dies between a cell's table and its marker
    atomic_write_json(qdir / f"{cell.id}.json", {"sha256": hashlib.sha256(data).hexdigest(), "run_id": run_id,
                                                 "level": cell.level, "arm": cell.arm, "setting": cell.setting.key(),
                                                 "seeds": [int(x) for x in rows["seed"]]})
    for stale in set(stale_cell_ids(run_id, cell.level, cell.arm, cell.setting)) - {cell.id}:  # older numerics
        (qdir / f"{stale}.json").unlink(missing_ok=True)  # the marker first: a table without one is never read
        (qdir / f"{stale}.parquet").unlink(missing_ok=True)


# ============================================================================ computing cells

class QuantStage:
    """The quant stage ``qc`` of one stored run: computes and stores its pending cells, level by level."""

    def __init__(self, run: StoredRun, qc: QuantConfig, *, batched: bool = True, write: bool = True,
                 log: Callable[[str], None] | None = None, cfg: ExperimentConfig | None = None,
                 record: bool = True):
        """``cfg``: the experiment whose cells (arms, seeds) are wanted (default: the stored run's);
        ``record``: ``qc`` is an experiment's ``[quant]`` table, recorded as the run's quant settings
        when cells are written (``lth quantize RUN`` starts from them); ``lth quantize`` records nothing."""
        self.run, self.qc, self.batched, self.write, self.log = run, qc, batched, write, log
        self.cfg = cfg or run.cfg
        self.record = record
        self.member_batch = member_batch_size(run.cfg.train)
        self.ev = Evaluator(run.data, run.cfg.train.eval_batch_size, self.member_batch)
        self._calib: np.ndarray | None = None
        self._float: dict = {}  # (level, members, shapes) -> float accuracy and size, the same for every setting
        # small-dense members of settings where it equals the narrow network up to float rounding run padded to
        # full width (:func:`pads_setting`): every quant level then shares level 0's programs; False: always narrow
        self.pad_small_dense = True
        self._pads: dict = {}  # narrow param shapes -> whether they pad exactly into the run's model
        self._full = None  # the run's full-width param shapes (jax.ShapeDtypeStruct), once a member pads

    @property
    def calib_x(self) -> np.ndarray:
        if self._calib is None:
            self._calib = self.run.calib_x(self.qc.calib_batches)
        return self._calib

    def run_levels(self, levels: Iterable[int] | None = None, *, recompute: bool = False) -> pd.DataFrame:
        """Compute (and store) the cells of ``levels`` (default ``quant.levels``, complete ones only)."""
        frames = [self.run_level(level, recompute=recompute) for level in
                  (quant_levels(self.cfg, self.qc) if levels is None else levels)]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)

    def run_level(self, level: int, *, recompute: bool = False) -> pd.DataFrame:
        """The rows of every cell of ``level`` computed now (done cells are skipped unless ``recompute``).

        A cell holds one row per seed of its arm: the wanted seeds are the config's that the level
        holds. A cell stored over fewer seeds (the run grew) gets only its missing seeds computed and
        is rewritten with its stored rows first."""
        run = self.run
        level_dir = run.check_level(level)
        main = run.population(level)
        small = run.small_dense(level) if "small_dense" in self.cfg.arms else None
        held = {m for m in main.members} | (set(small.members) if small is not None else set())
        seeds = [int(s) for s in self.cfg.seeds]
        todo = []  # (cell, seeds to compute, seeds kept from the stored cell)
        for c in cells(self.cfg, self.qc, [level]):
            want = [s for s in seeds if (c.arm, s) in held]
            have = [] if recompute or not self.write or cell_problem(level_dir, c.id) else cell_seeds(level_dir, c.id)
            new = [s for s in want if s not in have]
            if new:
                todo.append((c, new, have))
        if not todo:
            return pd.DataFrame(columns=COLUMNS)
        can_prune = prunable(unstack(main.params, 0), run.cfg.prune, structure_of(run.model))
        info = {m: (density(unstack(main.masks, k), can_prune), kept_count(unstack(main.masks, k)))
                for k, m in enumerate(main.members)}
        by_setting: dict[Setting, list] = {}
        for t in todo:
            by_setting.setdefault(t[0].setting, []).append(t)
        frames = []
        ft_acc: dict = {}  # (arm, seed) -> float_ft test accuracy computed now: QAT's log lines compare with it
        # the float controls first, so that every QAT line can name its float_ft reference
        for setting, group in sorted(by_setting.items(), key=lambda kv: kv[0].method != FLOAT_FT):
            wanted = {(c.arm, s) for c, new, _ in group for s in new}
            pops = []
            idx = [k for k, m in enumerate(main.members) if m in wanted]
            if idx:
                pops.append(main.take(idx))
            if small is not None and any(arm == "small_dense" for arm, _ in wanted):
                pops.append(small.take([k for k, m in enumerate(small.members) if m in wanted]))
                ticket_density = next(d for (arm, _), (d, _) in info.items() if arm == "ticket")
                info.update({m: (ticket_density, kept_count(unstack(small.masks, k))) for k, m in enumerate(small.members)})
            computed = []
            for pop in pops:
                t0 = time.time()
                rows = self._quantize(level, pop, setting)
                rows["wall_s"] = time.time() - t0
                if "density" not in rows:  # (sparsegpt_gptq rows carry their own)
                    rows["density"] = [float(info[m][0]) for m in pop.members]
                    rows["param_count"] = [int(info[m][1]) for m in pop.members]
                computed.append(rows)
                if setting.method == FLOAT_FT:  # (a language model's log lines compare bits per byte)
                    ref = "bits_per_byte" if is_language_model(run.data) else "accuracy"
                    ft_acc.update({(a, int(sd)): float(x)
                                   for a, sd, x in zip(rows["arm"], rows["seed"], rows[ref])})
                if self.log is not None:
                    self._log_rows(level, setting, rows, ft_acc)
            rows = pd.concat(computed, ignore_index=True)
            for c, new, have in group:
                part = rows[(rows["arm"] == c.arm) & rows["seed"].isin(new)]
                if not len(part):
                    continue
                part = part.assign(cell=c.id)
                if self.write:
                    old = (pd.read_parquet(level_dir / QUANT_DIR / f"{c.id}.parquet") if have
                           else part.iloc[:0])
                    write_cell(level_dir, c, run.run_id, pd.concat([old.reindex(columns=COLUMNS), part[COLUMNS]],
                                                                   ignore_index=True))
                frames.append(part[COLUMNS])
        if self.write and self.record:  # `lth quantize RUN` without --config starts from them
            write_quant_settings(run.path, self.qc.to_dict(), f"experiment {self.cfg.name!r}")
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)

    def _log_rows(self, level: int, setting: Setting, rows: pd.DataFrame, ft_acc: dict) -> None:
        """One log line per arm: its mean test accuracy, how many members, and its reference (QAT:
        float_ft, the float network fine-tuned with QAT's schedule; PTQ and float_ft: the float network)."""
        if is_language_model(self.run.data):
            return self._log_lm_rows(level, setting, rows, ft_acc)
        for arm, g in rows.groupby("arm", sort=False):
            n = len(g)
            if setting.method == "qat":
                stored = self._stored_float_ft(level, arm)
                ref = [ft_acc.get((arm, int(sd)), stored.get(int(sd))) for sd in g["seed"]]
                ref_text = ("float_ft not computed" if any(r is None for r in ref)
                            else f"float_ft {100 * float(np.mean(ref)):.2f}%")
            else:
                ref_text = f"float {100 * g['float_accuracy'].mean():.2f}%"
            self.log(f"level {level} {arm} {setting.label} ({n} member{'' if n == 1 else 's'}): test acc "
                     f"{100 * g['accuracy'].mean():.2f}% ({ref_text}) {g['wall_s'].iloc[0]:.1f} s")

    def _log_lm_rows(self, level: int, setting: Setting, rows: pd.DataFrame, ft_bpb: dict) -> None:
        """:meth:`_log_rows` for a language model: test bits per byte (lower is better) against the same
        references (QAT: its float_ft control; PTQ and float_ft: the float network)."""
        for arm, g in rows.groupby("arm", sort=False):
            n = len(g)
            if setting.method == "qat":
                stored = self._stored_float_ft(level, arm, "bits_per_byte")
                ref = [ft_bpb.get((arm, int(sd)), stored.get(int(sd))) for sd in g["seed"]]
                ref_text = ("float_ft not computed" if any(r is None or not np.isfinite(r) for r in ref)
                            else f"float_ft {float(np.mean(ref)):.4f}")
            else:
                ref_text = f"float {g['float_bits_per_byte'].mean():.4f}"
            self.log(f"level {level} {arm} {setting.label} ({n} member{'' if n == 1 else 's'}): test bits per "
                     f"byte {g['bits_per_byte'].mean():.4f} ({ref_text}; lower is better) {g['wall_s'].iloc[0]:.1f} s")

    def _stored_float_ft(self, level: int, arm: str, column: str = "accuracy") -> dict[int, float]:
        """seed -> test ``column`` (accuracy) of ``arm``'s stored float_ft cell at ``level`` (empty when none is intact)."""
        level_dir = self.run.level_dir(level)
        cid = cell_id(self.run.run_id, level, arm, float_ft_setting(self.qc))
        if cell_problem(level_dir, cid) is not None:
            return {}
        t = pd.read_parquet(level_dir / QUANT_DIR / f"{cid}.parquet")
        if column not in t:  # a cell stored before the column existed
            return {}
        return {int(a): float(b) for a, b in zip(t["seed"], t[column])}

    # ------------------------------------------------------------------ one setting, one population
    def _quantize(self, level: int, pop: Population, setting: Setting) -> pd.DataFrame:
        if self.batched or len(pop.members) == 1:
            return self._quantize_batch(level, pop, setting)
        return pd.concat([self._quantize_batch(level, pop.take([k]), setting) for k in range(len(pop.members))],
                         ignore_index=True)

    def _quantize_batch(self, level: int, pop: Population, setting: Setting) -> pd.DataFrame:
        narrow, pop = pop, self._padded(pop, setting)
        if setting.method == FLOAT_FT:
            return self._float_ft_batch(level, pop, narrow)
        qc, spec, model = self.qc, setting.spec, pop.model
        float_acc, float_sizes = self._float_reference(level, pop, narrow)
        float_val = float_acc.get("val", float_acc["test"])
        tried, steps, lr = [spec.calibration], 0, 0.0
        if setting.method == "ptq" and qc.retry:
            judge = dict(setting.options).get("retry_judge")
            judge_bpb = judge == "val_bits_per_byte"
            if judge_bpb and not is_language_model(self.run.data):
                raise ConfigError(f"data {self.run.cfg.data.name!r} is declared a text corpus (text = True) but "
                                  "its loader returned no token stream; declare text only for a TokenStream loader")
            if is_language_model(self.run.data) and not judge_bpb:
                raise ConfigError(f"data {self.run.cfg.data.name!r} loads as a token stream (a language model) but "
                                  "is not declared a text corpus: give its loader the attribute text = True "
                                  "(quant.retry judges a language model by bits per byte)")
            if judge_bpb:  # a language model
                losses = self._float[_float_key(level, pop)][2]
                float_val = -lm_bits(losses.get("val", losses["test"]))
            qts, metrics, tried = self._retry(pop, spec, float_val, judge)
        elif setting.method in GPTQ_METHODS:
            joint = setting.method == "sparsegpt_gptq"
            qts, masks = gptq_population(model, pop.params, pop.batch_stats, pop.masks, spec, self.calib_x,
                                         group_size=qc.group_size, act_order=qc.act_order, damp=qc.gptq_damp,
                                         density=qc.joint_density if joint else None,
                                         member_batch=self.member_batch, return_masks=True)
            metrics = self.ev.quantized_metrics(model, qts)
        elif setting.method == "ptq":
            qts = ptq_population(model, pop.params, pop.batch_stats, spec, self.calib_x,
                                 bias_correction=qc.bias_correction, cle=qc.cle, member_batch=self.member_batch)
            metrics = self.ev.quantized_metrics(model, qts)
        else:
            qts, steps, lr = self._qat(level, pop, spec)
            metrics = self.ev.quantized_metrics(model, qts)
        acc = {name: a for name, (_, a) in metrics.items()}
        lm = self._lm_columns(level, pop, metrics)
        if pop is not narrow:  # sizes of the narrow network: its kernels and per-channel quantizers
            qts = [narrow_ticket(qt, narrow) for qt in qts]
        rows = []
        for k, (arm, seed) in enumerate(pop.members):
            sizes = size_report(qts[k], nm_of(self.run.cfg.prune))  # N:M kernels in the nm encoding
            rows.append({
                "run_id": self.run.run_id, "level": level, "arm": arm, "seed": seed,
                "bits": spec.bits, "method": setting.method, "scheme": spec.scheme_name,
                "granularity": (f"group{qc.group_size}" if setting.method in GPTQ_METHODS and qc.group_size
                                else spec.granularity), "calibration": qts[k].calibration,
                "act_bits": int(spec.act_bits or 0), "act_scheme": spec.act_scheme if spec.act_bits else "",
                "accuracy": float(acc["test"][k]), "val_accuracy": float(acc.get("val", acc["test"])[k]),
                "float_accuracy": float(float_acc["test"][k]), "float_val_accuracy": float(float_val[k]),
                "size_bytes": int(sizes["size_bytes"]), "compression": float(sizes["compression"]),
                "float_size_bytes": float_sizes[k],
                "fp32_dense_bytes": int(sizes["fp32_dense_bytes"]), "fp16_dense_bytes": int(sizes["fp16_dense_bytes"]),
                "int8_dense_bytes": int(sizes["int8_dense_bytes"]),
                "bias_correction": bool(qc.bias_correction and setting.method == "ptq"),
                "cle": bool(qc.cle and setting.method == "ptq"),
                "learned_scale": bool(qc.learned_scale and setting.method == "qat"),
                "qat_start": qc.qat_start if setting.method == "qat" else "",
                "qat_steps": int(steps), "qat_lr": float(lr), "retry": bool(qc.retry and setting.method == "ptq"),
                "calibration_requested": (",".join(qc.calibration) if setting.method == "ptq" and qc.retry
                                          else spec.calibration),
                "calibration_tried": ",".join(tried),
                "group_size": int(qc.group_size or 0) if setting.method in GPTQ_METHODS else 0,
                "act_order": bool(qc.act_order and setting.method in GPTQ_METHODS), **lm[k],
            })
        rows = pd.DataFrame.from_records(rows)
        if setting.method == "sparsegpt_gptq":  # its own, sparser masks: the rows' density and count are theirs
            can_prune = prunable(unstack(pop.params, 0), self.run.cfg.prune, structure_of(model))
            rows["density"] = [float(density(unstack(masks, k), can_prune)) for k in range(len(pop.members))]
            rows["param_count"] = [int(kept_count(unstack(masks, k))) for k in range(len(pop.members))]
        return rows

    def _float_ft_batch(self, level: int, pop: Population, narrow: Population | None = None) -> pd.DataFrame:
        """The float_ft rows of a population: each member fine-tuned in float with QAT's schedule (the
        QAT program of :func:`program_spec` with quantization switched off), evaluated like the float
        network. ``bits = 32``; ``float_accuracy`` is the float network before the fine-tuning."""
        qc = self.qc
        narrow = pop if narrow is None else narrow
        float_acc, float_sizes = self._float_reference(level, pop, narrow)
        ft, steps, lr = self._qat(level, pop, program_spec(qc), quantize=False)
        metrics = self.ev.metrics(pop.model, ft["params"], ft["batch_stats"])
        acc = {name: a for name, (_, a) in metrics.items()}
        lm = self._lm_columns(level, pop, metrics)
        if pop is not narrow:  # sizes of the narrow network
            ft = {"params": unpad_params(ft["params"], _shapes(narrow.params)), "batch_stats": ft["batch_stats"]}
        rows = []
        for k, (arm, seed) in enumerate(pop.members):
            sizes = float_size_report(unstack(ft["params"], k), unstack(ft["batch_stats"], k))
            rows.append({
                "run_id": self.run.run_id, "level": level, "arm": arm, "seed": seed, "bits": 32, "method": FLOAT_FT,
                "scheme": "float", "granularity": "", "calibration": "", "act_bits": 32, "act_scheme": "",
                "accuracy": float(acc["test"][k]), "val_accuracy": float(acc.get("val", acc["test"])[k]),
                "float_accuracy": float(float_acc["test"][k]),
                "float_val_accuracy": float(float_acc.get("val", float_acc["test"])[k]),
                "size_bytes": int(sizes["size_bytes"]), "compression": sizes["fp32_dense_bytes"] / sizes["size_bytes"],
                "float_size_bytes": float_sizes[k], "fp32_dense_bytes": int(sizes["fp32_dense_bytes"]),
                "fp16_dense_bytes": int(sizes["fp32_dense_bytes"]) // 2, "int8_dense_bytes": np.nan,
                "bias_correction": False, "cle": False, "learned_scale": False, "qat_start": qc.qat_start,
                "qat_steps": int(steps), "qat_lr": float(lr), "retry": False, "calibration_requested": "",
                "calibration_tried": "", "group_size": 0, "act_order": False, **lm[k],
            })
        return pd.DataFrame.from_records(rows)

    def _float_reference(self, level: int, pop: Population, narrow: Population | None = None) -> tuple[dict, list[int]]:
        """The float members' accuracy (split -> ``[K]``) and size in bytes, computed once per level and
        population (every setting of the level compares against them). ``narrow``: the small-dense members
        ``pop`` holds padded (:meth:`_padded`), whose sizes are the ones counted."""
        key = _float_key(level, pop)
        if key not in self._float:
            if len(self._float) > 16:
                self._float.clear()
            metrics = self.ev.metrics(pop.model, pop.params, pop.batch_stats)
            acc = {name: a for name, (_, a) in metrics.items()}
            narrow = pop if narrow is None else narrow
            sizes = [int(float_size_report(unstack(narrow.params, k), unstack(narrow.batch_stats, k))["size_bytes"])
                     for k in range(len(narrow.members))]
            self._float[key] = (acc, sizes, {name: loss for name, (loss, _) in metrics.items()})
        return self._float[key][:2]

    def _lm_columns(self, level: int, pop: Population, metrics: dict) -> list[dict]:
        """Per member, the :data:`LM_COLUMNS` of its evaluation ``metrics`` (split -> (loss, accuracy) ``[K]``):
        the mean token loss on test and val, and for a language model its perplexity and bits per byte
        (:func:`lth.train.lm_metrics`) beside the float network's bits per byte; NaN where they do not apply."""
        self._float_reference(level, pop)
        float_loss = self._float[_float_key(level, pop)][2]
        lm = is_language_model(self.run.data)
        out = []
        for k in range(len(pop.members)):
            row = {}
            for split, prefix in (("test", ""), ("val", "val_")):
                loss = float(metrics.get(split, metrics["test"])[0][k])
                ref = float(float_loss.get(split, float_loss["test"])[k])
                m, f = (lm_metrics(loss), lm_metrics(ref)) if lm else ({}, {})
                row.update({f"{prefix}loss": loss, f"{prefix}perplexity": m.get("perplexity", np.nan),
                            f"{prefix}bits_per_byte": m.get("bits_per_byte", np.nan),
                            f"float_{prefix}bits_per_byte": f.get("bits_per_byte", np.nan)})
            out.append(row)
        return out

    def _padded(self, pop: Population, setting: Setting) -> Population:
        """``pop`` itself, or its small-dense members padded to the run's full-width model (units beyond the
        narrow widths zero and masked off, as :meth:`lth.lottery.runner.Lottery._train_small_dense` trains
        them) where that gives the narrow network's numbers up to float rounding (:func:`pads_setting`), so
        every quant level runs level 0's programs instead of compiling its own for a new width."""
        if not (self.pad_small_dense and pop.members and pop.members[0][0] == "small_dense"
                and pads_setting(self.qc, setting) and not jax.tree.leaves(pop.batch_stats)):
            return pop
        run, shapes = self.run, _shapes(pop.params)
        key = tuple(s.shape for s in jax.tree.leaves(shapes))
        if key not in self._pads:
            self._pads[key] = pads_exactly(pop.model, run.model, tuple(run.data.input_shape))
        if not self._pads[key]:
            return pop
        if self._full is None:  # the run's full-width param shapes, traced once per stage
            self._full = jax.eval_shape(lambda k: init_variables(run.model, k, run.data.input_shape)[0],
                                        jax.random.key(0))
        full = self._full
        params, live = pad_params(pop.params, full)
        masks = jax.tree.map(np.logical_and, pad_params(pop.masks, full)[0], live)
        return Population(run.model, list(pop.members), params, {}, masks)

    def _retry(self, pop: Population, spec: QuantSpec, float_val: np.ndarray, judge: str | None = None):
        """Recompute S and Z another way until the val drop is within tolerance (per member).

        Tries ``quant.calibration`` in order; keeps the first within ``quant.tolerance`` of the
        float val accuracy, else the best val accuracy seen. ``judge = "val_bits_per_byte"`` (a language
        model): the same on val bits per byte, lower is better (``float_val`` is then minus the float
        network's val bits per byte, and the tolerance is in bits per byte).
        """
        qc, K = self.qc, len(pop.members)
        best: list = [None] * K
        done = [False] * K
        tried: list[str] = []
        for cal in qc.calibration:
            if all(done):
                break
            tried.append(cal)
            qts = ptq_population(pop.model, pop.params, pop.batch_stats, spec.replace(calibration=cal), self.calib_x,
                                 bias_correction=qc.bias_correction, cle=qc.cle, member_batch=self.member_batch)
            if judge == "val_bits_per_byte":
                losses = {name: loss for name, (loss, _) in self.ev.quantized_metrics(pop.model, qts).items()}
                val = -lm_bits(losses.get("val", losses["test"]))
            else:
                val = self.ev.quantized(pop.model, qts)
                val = val.get("val", val["test"])
            for k in range(K):
                if done[k]:
                    continue
                within = float_val[k] - val[k] <= qc.tolerance
                if best[k] is None or val[k] > best[k][1] or within:
                    best[k] = (qts[k], val[k])
                done[k] = within
        qts = [b[0] for b in best]
        return qts, self.ev.quantized_metrics(pop.model, qts), tried

    def _qat(self, level: int, pop: Population, spec: QuantSpec,
             quantize: bool = True) -> tuple[list[QuantizedTicket] | dict, int, float]:
        """QAT of a population as ``quant.*`` says: (quantized members, steps, lr); with ``quantize=False``
        its float control instead (:func:`lth.quant.qat.float_ft`: ``{"params", "batch_stats"}``
        stacked), trained with the same schedule by the same code.

        From the trained network (default): ``qat_steps`` (default one epoch) at the constant
        ``qat_lr`` (default train.lr / 10). From the rewind point: the run's full training length
        and schedule, unless ``qat_steps`` / ``qat_lr`` are set; each arm restarts from the weights
        it was trained from (the rewind point, a reinit's fresh init, a small-dense model's init).
        """
        qc, run = self.qc, self.run
        cfg = run.cfg
        seeds = [s for _, s in pop.members]
        n_train = len(run.data.x_train)
        if qc.qat_start == "rewind":
            start = self._start_weights(level, pop)
            steps = qc.qat_steps or run.hparams.get("num_steps") or total_steps(cfg.train, n_train)
            lr_kw = {"lr": qc.qat_lr} if qc.qat_lr else {"lr_fn": make_schedule(cfg.train, steps)}
            lr = qc.qat_lr or cfg.train.lr  # (the schedule's peak)
        else:
            start = {"params": pop.params, "batch_stats": pop.batch_stats}
            steps = qc.qat_steps or steps_per_epoch(cfg.train, n_train)
            lr = qc.qat_lr or cfg.train.lr / 10
            lr_kw = {"lr": lr}
        fine_tune = qat if quantize else float_ft
        out, _ = fine_tune(pop.model, run.data, cfg.train, start["params"], start["batch_stats"], pop.masks, spec,
                           self.calib_x, seeds=seeds, steps=int(steps), learned_scale=qc.learned_scale, **lr_kw)
        return out, int(steps), float(lr)

    def _start_weights(self, level: int, pop: Population) -> dict:
        run = self.run
        if pop.members[0][0] == "small_dense":
            params, bs = init_population(pop.model, seed_keys([s for _, s in pop.members]), run.data.input_shape)
            return jax.device_get({"params": params, "batch_stats": bs})
        seeds = sorted({seed for arm, seed in pop.members if not (arm == "reinit" and level > 0)})
        rewind = run.weights_file("rewind.msgpack" if run.cfg.rewind.step > 0 else "init.msgpack", seeds)
        members = []
        for arm, seed in pop.members:
            if arm == "reinit" and level > 0:
                members.append(reinit_weights(pop.model, seed, level, run.data.input_shape))
            else:
                members.append(unstack(rewind, seeds.index(seed)))  # by value: rewind is stacked in seeds order
        return stack(members)


# ============================================================================ small-dense members padded

# the methods whose small-dense cells may run padded (:func:`pads_setting`). QAT amplifies the padded forward
# pass's last-bit differences (an activation on a rounding boundary flips its code and training carries it on:
# 1.2e-4 relative on the loss at 8 bits on the quickstart); drop "qat" here to keep it narrow (and compiled per width)
PADDED_METHODS = ("ptq", "qat", FLOAT_FT)


def pads_setting(qc: QuantConfig, setting: Setting) -> bool:
    """Whether ``setting`` gives a small-dense member padded to full width (zero, masked units) the narrow
    network's numbers up to float rounding. Yes for PTQ, QAT (fixed ranges) and float_ft: weight ranges
    are calibrated from a kernel's non-zero entries only (a padded channel gets S = 1, Z = 0 and stays
    exactly 0), and min-max activation ranges are widened to contain 0 anyway, so the padded units' zero
    activations change no range. Kept narrow: activation ranges by percentile or MSE (they sample the
    padded zeros), LSQ (its gradient scale ``1 / sqrt(N Qp)`` counts the padded units), CLE, bias
    correction and retry (not checked), QAT from the rewind point (the narrow init), GPTQ methods."""
    if setting.method not in PADDED_METHODS:
        return False
    if setting.method == "ptq":
        if qc.retry or qc.bias_correction or qc.cle:
            return False
    elif qc.learned_scale or qc.qat_start != "trained":  # qat, float_ft
        return False
    spec = setting.spec if setting.spec is not None else program_spec(qc)
    return spec.act_bits is None or (spec.act_calibration or spec.calibration) == "minmax"


def narrow_ticket(qt: QuantizedTicket, narrow: Population) -> QuantizedTicket:
    """A padded small-dense member's quantized network cut back to the narrow one (``narrow``: its
    population): the leading blocks of its params and the quantizers of its own output channels."""
    params = unpad_params(qt.params, _shapes(narrow.params))
    wq = {}
    for key, qp in qt.weight_qparams.items():
        c = np.shape(get_layer(params, key)["kernel"])[-1]
        wq[key] = {n: (np.asarray(v)[..., :c] if np.ndim(v) else v) for n, v in qp.items()}
    return dataclasses.replace(qt, params=params, weight_qparams=wq)


def _shapes(stacked) -> Any:
    """The shapes of one member of a stacked ``[K, ...]`` tree."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], np.asarray(x).dtype), stacked)


def lm_bits(losses) -> np.ndarray:
    """Bits per byte ``[K]`` of mean next-token losses ``[K]`` (:func:`lth.train.lm_metrics`)."""
    return np.array([lm_metrics(float(v))["bits_per_byte"] for v in np.asarray(losses)])


def _float_key(level: int, pop: Population) -> tuple:
    """The float reference's cache key: a padded population is another program's numbers."""
    return level, tuple(pop.members), tuple(np.shape(x) for x in jax.tree.leaves(pop.params))


# ============================================================================ entry points

def quant_config(base: QuantConfig | None = None, **settings) -> QuantConfig:
    """``base`` (default: every default) with ``settings`` (QuantConfig fields) replaced, validated."""
    d = (base or QuantConfig()).to_dict()
    for k, v in settings.items():
        d[k] = list(v) if isinstance(v, (tuple, list)) else v
    return QuantConfig.from_dict(d)


def quantize_run(run_dir: str | Path, levels: Iterable[int] | None = None, bits_list: Sequence[int] | None = None,
                 methods: Sequence[str] | None = None, *, config: QuantConfig | None = None, write: bool = True,
                 batched: bool = True, recompute: bool = False, log: Callable[[str], None] | None = None,
                 **settings) -> pd.DataFrame:
    """Add quant cells to a stored run (``lth quantize``): the stage's code path on a finished run.

    ``config`` (default: the ``[quant]`` settings of the experiment that last ran the run's quant stage,
    :func:`lth.stored.stored_quant_settings`, else the defaults) with ``bits_list``, ``methods`` and ``settings`` (any :class:`~lth.config.QuantConfig`
    field) replaced. ``levels`` defaults to ``quant.levels`` (its
    default ``"all"``: every complete level). Cells already done are skipped (``recompute`` redoes them). Returns the
    rows computed now; columns :data:`COLUMNS`.
    """
    if bits_list is not None:
        settings["bits"] = bits_list
    if methods is not None:
        settings["method"] = methods
    if config is None:
        last = stored_quant_settings(run_dir)
        config = QuantConfig.from_dict(last[0], str(Path(run_dir) / QUANT_SETTINGS)) if last else None
    qc = quant_config(config, **settings)
    run = StoredRun.open(run_dir)
    complete = run.complete_levels()
    if levels is None:
        levels = complete if qc.levels == "all" else quant_levels(run.cfg, qc)
    levels = [int(x) for x in levels]
    missing = [x for x in levels if x not in complete]
    if missing:
        raise ConfigError(f"{run.path}: level(s) {', '.join(map(str, missing))} are not complete; complete "
                          f"levels: {', '.join(map(str, complete)) or 'none'}")
    check_quant(run.cfg, qc, str(run.path))
    if set(GPTQ_METHODS) & set(qc.method) and levels:
        try:
            check_gptq_model(unstack(run.population(levels[0]).params, 0))
        except ValueError as e:
            raise ConfigError(f"{run.path}: {e}") from None
    stage = QuantStage(run, qc, write=write, batched=batched, log=log, record=False)
    if write:
        with run.store.lock():
            return stage.run_levels(levels, recompute=recompute)
    return stage.run_levels(levels)


def quantize_member(run: StoredRun, level: int, spec: QuantSpec, *, member: int = 0, method: str = "ptq",
                    qc: QuantConfig | None = None) -> tuple[QuantizedTicket, dict]:
    """One ticket member of a level quantized (PTQ, QAT or GPTQ with ``qc``'s group_size, act_order and
    gptq_damp); also returns ``{"arm", "seed"}``."""
    qc = qc or QuantConfig()
    pop = run.population(level)
    tickets = [k for k, (arm, _) in enumerate(pop.members) if arm == "ticket"]
    if not 0 <= member < len(tickets):
        raise ValueError(f"member {member} does not exist; level {level} has {len(tickets)} ticket members")
    one = pop.take([tickets[member]])
    stage = QuantStage(run, qc, write=False)
    if method == "ptq":
        qt = ptq_population(one.model, one.params, one.batch_stats, spec, stage.calib_x,
                            bias_correction=qc.bias_correction, cle=qc.cle)[0]
    elif method == "qat":
        qt = stage._qat(level, one, spec)[0][0]
    elif method == "gptq":
        qt = gptq_population(one.model, one.params, one.batch_stats, one.masks, spec, stage.calib_x,
                             group_size=qc.group_size, act_order=qc.act_order, damp=qc.gptq_damp)[0]
    else:
        raise ValueError(f"method = {method!r}; allowed: ptq, qat, gptq")
    arm, seed = one.members[0]
    return qt, {"arm": arm, "seed": seed}


# ============================================================================ runs -> files

def export_level(run_dir: str | Path, level: int, bits: int, path: str | Path, *, member: int = 0,
                 method: str = "ptq", scheme: str = "sym", granularity: str = "channel",
                 calibration: str = "minmax", act_bits: int = 8, act_scheme: str = "asym",
                 **settings) -> dict[str, Any]:
    """Quantize ticket ``member`` of a stored level and write its export file atomically.

    ``settings`` are :class:`lth.quant.QuantConfig` fields used by PTQ/QAT (``bias_correction``,
    ``cle``, ``learned_scale``, ``qat_steps``, ``calib_batches`` ...). Returns a summary: sizes,
    compression, and the test accuracy of the integer model, of the fake-quant model and their
    prediction agreement.
    """
    run = StoredRun.open(run_dir)
    complete = run.complete_levels()
    if level not in complete:
        raise StoreError(f"{run.path}: level {level} is not complete; complete levels: "
                         f"{', '.join(map(str, complete)) or 'none'}")
    layer_program(run.model)  # before quantizing: ValueError for a model the integer program cannot run
    qc = quant_config(None, method=[method], **settings)
    check_gptq_settings(qc, "lth export")
    if method == "gptq":  # GPTQ fits its own grid: per channel, or per group of quant.group_size inputs
        check_gptq_model(unstack(run.population(level).params, 0), "--method")
        granularity = f"group{qc.group_size}" if qc.group_size else "channel"
    spec = QuantSpec(bits, scheme, granularity if method != "gptq" else "channel", calibration, act_bits,
                     act_scheme, None, qc.percentile)
    qt, who = quantize_member(run, level, spec, member=member, method=method, qc=qc)
    im = from_quantized(run.model, qt, run.data.input_shape, run.data.num_classes)
    nm = nm_of(run.cfg.prune)  # N:M tickets store their kernels as N:M
    sizes = size_report(qt, nm)
    info = {"run_id": run.run_id, "level": level, "member": who, "method": method, "bits": bits,
            "scheme": spec.scheme_name, "granularity": granularity, "calibration": qt.calibration,
            "act_bits": act_bits, "act_scheme": act_scheme, "data": dataclasses.asdict(run.cfg.data),
            "model": run.cfg.model.name, "size_bytes": sizes["size_bytes"],
            "fp32_dense_bytes": sizes["fp32_dense_bytes"], "compression": sizes["compression"]}
    file_bytes = write_export(path, im, info, nm)
    x, y = run.data.x_test, run.data.y_test
    pred_int = im.predict(x)
    pred_fq = fake_quant_predict(run.model, qt, x)
    return {"path": str(path), "file_bytes": file_bytes, "size_bytes": sizes["size_bytes"],
            "fp32_dense_bytes": sizes["fp32_dense_bytes"], "compression": sizes["compression"],
            "integer_accuracy": float(np.mean(pred_int == y)),
            "fake_quant_accuracy": float(np.mean(pred_fq == y)),
            "agreement": float(np.mean(pred_int == pred_fq)), **{k: info[k] for k in ("run_id", "level", "member",
                                                                                      "method", "bits", "scheme")}}
