"""Comparisons at equal training: every model is compared with a float network trained exactly as much.

QAT fine-tunes each member for extra steps, so a QAT model is never compared with the float network
it started from: its reference is ``float_ft``, the same member fine-tuned in float with QAT's exact
schedule (the quant stage stores it as rows with ``method = "float_ft"``, ``bits = 32``). Float and
PTQ models trained no more than the float network, whose reference it is. (DESIGN.md, Fair
comparison, rule 1.)
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

FLOAT_FT = "float_ft"
# the reference of each method: the float network trained exactly as much (methods not named here train
# no further than the float network: their reference is "float")
REFERENCE = {"float": "float", "ptq": "float", "qat": FLOAT_FT}
# a QAT row and its float_ft control: the same member, the same fine-tuning schedule
PAIR_KEYS = ["run_id", "level", "arm", "seed", "qat_start", "qat_steps", "qat_lr"]
CANDIDATE_KEYS = ["run_id", "arm", "level", "bits", "method", "scheme", "granularity", "calibration", "act_bits",
                  "act_order", "reference"]


def with_reference(df: pd.DataFrame) -> pd.DataFrame:
    """The candidate models of a :func:`analysis.load_runs` table, one row per seed, each with its reference.

    Candidates: the final float network of each (run, arm, level, seed) with a measured size, and every
    quantized row (not the float_ft controls: they are references, not compressed models). Added columns:

    - ``reference``: ``"float"`` (float and PTQ rows) or ``"float_ft"`` (QAT rows);
    - ``reference_accuracy``: that reference's test accuracy for the same (run, arm, level, seed) (and,
      for QAT, the same schedule: ``qat_start``, ``qat_steps``, ``qat_lr``);
    - ``change``: ``accuracy - reference_accuracy``, the paired effect of quantizing at equal training;
    - ``judged_accuracy``: the float network's accuracy plus ``change`` (for float and PTQ rows: the
      accuracy itself), the accuracy the model would have had without the extra training.

    The dense level 0 is the arm ``dense``. QAT rows without their float_ft (stores quantized before
    it existed) cannot be compared fairly and are left out, with a warning.
    """
    from .runs import float_ft_rows, float_rows, quant_rows
    from .summary import final_rows

    fl = final_rows(float_rows(df)).dropna(subset=["size_bytes"])
    fl = fl.assign(reference="float", reference_accuracy=fl["accuracy"], float_accuracy=fl["accuracy"])
    q = quant_rows(df).dropna(subset=["size_bytes"])
    q = q.assign(reference=q["method"].map(REFERENCE).fillna("float"))
    plain = q[q["reference"] == "float"]
    plain = plain.assign(reference_accuracy=plain["float_accuracy"])
    qat = q[q["reference"] == FLOAT_FT]
    if len(qat):
        ft = float_ft_rows(df)
        ft = ft[PAIR_KEYS + ["accuracy"]].rename(columns={"accuracy": "reference_accuracy"}) if len(ft) else \
            pd.DataFrame(columns=PAIR_KEYS + ["reference_accuracy"])
        ft = ft.drop_duplicates(PAIR_KEYS)
        qat = qat.merge(ft, on=PAIR_KEYS, how="left")
        lack = qat["reference_accuracy"].isna()
        if lack.any():
            warnings.warn(f"{int(lack.sum())} QAT row(s) have no float_ft control (quantized before lth stored it): "
                          f"left out of the comparison; rerun the quant stage (`lth quantize`) to add it",
                          stacklevel=2)
            qat = qat[~lack]
    parts = [r for r in (fl, plain, qat) if len(r)]
    if not parts:
        return pd.DataFrame(columns=list(dict.fromkeys([*df.columns, "float_accuracy", "reference", "reference_accuracy",
                                                        "change", "judged_accuracy"])))
    rows = pd.concat(parts, ignore_index=True)
    rows["change"] = rows["accuracy"] - rows["reference_accuracy"]
    rows["judged_accuracy"] = rows["float_accuracy"] + rows["change"]
    return rows.assign(arm=np.where(rows["level"] == 0, "dense", rows["arm"]))


def smallest_within(df: pd.DataFrame, tolerance: float = 0.01) -> pd.DataFrame:
    """Per run and arm: the smallest model (bytes, density, bits, method) within ``tolerance`` (0.01 =
    1 point) of the dense float network's test accuracy, at equal training.

    A candidate qualifies when its mean ``judged_accuracy`` (:func:`with_reference`: the float
    network's accuracy plus the paired change against the reference trained exactly as much) is at
    least the dense float accuracy minus ``tolerance``. For float and PTQ models that is their own
    accuracy (reference ``float``); a QAT model is judged by its change against its float_ft control of
    the same (run, arm, level, seed) (reference ``float_ft``), so QAT's extra fine-tuning is not
    counted as a gain of quantization. Columns: run_id, arm, dense_float_accuracy, size_bytes,
    density, bits, method, reference, accuracy (the model's own mean test accuracy),
    reference_accuracy, judged_accuracy, seeds, compression_vs_dense.
    """
    from .figures import ARM_STYLE

    cand = with_reference(df)
    if "act_order" not in cand:  # a table of stores quantized before GPTQ's act_order existed
        cand = cand.assign(act_order=False)
    cols = ["run_id", "arm", "dense_float_accuracy", "size_bytes", "density", "bits", "method", "reference", "accuracy",
            "reference_accuracy", "judged_accuracy", "seeds", "compression_vs_dense"]
    if cand.empty:
        return pd.DataFrame(columns=cols)
    points = (cand.groupby(CANDIDATE_KEYS, sort=False, dropna=False)
              .agg(size_bytes=("size_bytes", "mean"), density=("density", "mean"), accuracy=("accuracy", "mean"),
                   reference_accuracy=("reference_accuracy", "mean"), judged_accuracy=("judged_accuracy", "mean"),
                   seeds=("seed", "nunique"))
              .reset_index())
    rows = []
    for run_id, p in points.groupby("run_id", sort=False):
        dense = p[(p["arm"] == "dense") & (p["method"] == "float")]
        if dense.empty:
            continue
        ref = float(dense["accuracy"].iloc[0])
        ok = p[p["judged_accuracy"] >= ref - tolerance]
        for arm in [a for a in ARM_STYLE if a in set(p["arm"])]:
            a = ok[ok["arm"] == arm].sort_values(["size_bytes", "judged_accuracy"], ascending=[True, False])
            if not len(a):
                rows.append({"run_id": run_id, "arm": arm, "dense_float_accuracy": ref,
                             "method": "none within tolerance", "reference": ""})
                continue
            best = a.iloc[0]
            rows.append({"run_id": run_id, "arm": arm, "dense_float_accuracy": ref,
                         **{c: best[c] for c in ("size_bytes", "density", "bits", "method", "reference", "accuracy",
                                                  "reference_accuracy", "judged_accuracy", "seeds")},
                         "compression_vs_dense": float(dense["size_bytes"].iloc[0]) / best["size_bytes"]})
    return pd.DataFrame(rows, columns=cols)
