"""How the one-shot arms of a level "train" (:data:`lth.lottery.arms.ONESHOT_ARMS`).

A one-shot arm's member is the trained dense network pruned in one shot: its start weights are the
pruned weights. The plain arms (``oneshot_magnitude``, ``wanda``, ``sparsegpt``) do not train: they are
evaluated as they are, and their metrics rows are that evaluation at step 0 (their final weights are
the pruned weights). The ``*_ft`` arms are fine-tuned from step 0 for ``prune.oneshot_finetune_steps``
at the constant ``prune.oneshot_finetune_lr`` (default: the final lr of the training schedule), the
mask kept; their names say they trained more than the network they were pruned from (fair-comparison
rule 1). The rest of the level trains as before; the parts are merged back into one result in the
population's member order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..config import ONESHOT_ARMS, ONESHOT_FT_ARMS, ConfigError
from ..train import Engine, TrainResult, final_lr, lm_metrics, total_steps


def parts(members) -> dict[str, list[int]]:
    """Member indices by how they run: ``train`` (the level's engine), ``evaluate`` (plain one-shot arms),
    ``finetune`` (the ``*_ft`` arms)."""
    out = {"train": [], "evaluate": [], "finetune": []}
    for k, m in enumerate(members):
        out["evaluate" if m.arm in ONESHOT_ARMS else "finetune" if m.arm in ONESHOT_FT_ARMS else "train"].append(k)
    return out


def check_finetune_lr(cfg, n_train: int) -> None:
    """ConfigError before any work when ``*_ft`` arms would fine-tune at lr 0: the default
    ``prune.oneshot_finetune_lr`` is train's final lr, which a schedule decaying to 0 (cosine, linear) makes
    0, so the arm would be its plain arm under another name."""
    if not set(cfg.arms) & set(ONESHOT_FT_ARMS) or cfg.prune.oneshot_finetune_lr:
        return
    if final_lr(cfg.train, total_steps(cfg.train, n_train)) <= 0:
        raise ConfigError(f"arms {sorted(set(cfg.arms) & set(ONESHOT_FT_ARMS))}: the default "
                          f"prune.oneshot_finetune_lr (train's final lr) is 0 with train.schedule = "
                          f"{cfg.train.schedule!r}; set prune.oneshot_finetune_lr, e.g. {cfg.train.lr / 10:g}")


def finetune_engine(model, data, cfg) -> Engine:
    """The engine of the ``*_ft`` arms: ``prune.oneshot_finetune_steps`` steps at a constant lr."""
    pc = cfg.prune
    lr = pc.oneshot_finetune_lr or final_lr(cfg.train, total_steps(cfg.train, len(data.x_train)))
    train = dataclasses.replace(cfg.train, steps=pc.oneshot_finetune_steps, epochs=None)
    return Engine(model, data, train, lr_fn=optax.constant_schedule(lr), lr_key=("constant", float(lr)))


def evaluate_records(engine: Engine, state) -> list[dict]:
    """Metric rows of a population evaluated as it is: val and test at step 0 (and, for a language model,
    perplexity and bits per byte, as :class:`lth.train.Engine` records them)."""
    rows = []
    for split, (loss, acc) in engine.evaluate(state).items():
        for k in range(len(loss)):
            rows.append({"member": k, "step": 0, "split": split, "loss": float(loss[k]), "accuracy": float(acc[k]),
                         **(lm_metrics(float(loss[k])) if engine.window else {})})  # a language model's bits per byte
    return rows


def merge(pieces: list[tuple[list[int], TrainResult]], k: int) -> TrainResult:
    """One result of ``k`` members from results of disjoint index sets (each in its set's order)."""
    order = np.empty(k, np.int64)
    pos = 0
    for idx, _ in pieces:
        order[idx] = np.arange(pos, pos + len(idx))
        pos += len(idx)

    def cat(*xs):
        if jax.dtypes.issubdtype(xs[0].dtype, jax.dtypes.prng_key):  # keys have no numpy form
            return jnp.concatenate(xs)[jax.device_put(order)]
        return np.concatenate([np.asarray(x) for x in xs])[order]

    state = jax.tree.map(cat, *[r.state for _, r in pieces])
    records, diverged, snapshots = [], {}, {}
    for idx, r in pieces:
        records += [{**row, "member": idx[row["member"]]} for row in r.records]
        diverged.update({idx[m]: s for m, s in r.diverged.items()})
    return TrainResult(state=state, records=records, snapshots=snapshots, diverged=diverged)
