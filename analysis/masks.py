"""Mask analysis of an lth store, from the stored masks and weights only (no retraining, numpy).

- Jaccard overlap ``|A & B| / |A | B|`` of ticket masks between seeds at each level, and between the
  levels of one seed;
- the ticket against one-shot magnitude pruning at the ticket's per-layer counts: the top-k |w| of the
  init, and of the level-0 trained weights (plain top-k on the stored arrays, ties to the lower index
  as lth's selection does);
- the fraction of the ticket's surviving weights whose trained sign differs from their sign at init;
- the early-bird mask distances that the dense level recorded (``level_000/earlybird.parquet``;
  older stores lack it).

Every overlap is given per prunable layer and over all of them (``layer = 'all'``).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from .runs import NotAStoreError, complete_levels, run_dirs

ALL = "all"
MOVING_ARMS = ("set", "rigl")  # arms whose masks change during training (the others: ever active = final)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """``|a & b| / |a | b|`` of two bool masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0


def random_jaccard(density: float) -> float:
    """``d / (2 - d)``: the Jaccard overlap two independent random masks of density d have on average
    (to first order in 1/size): the chance level of the overlaps."""
    return float(density / (2 - density))


def topk_mask(values: np.ndarray, k: int) -> np.ndarray:
    """Mask keeping the ``k`` largest ``|values|`` (ties: the lower index), the shape of ``values``."""
    flat = np.abs(np.asarray(values, np.float64)).ravel()
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep.reshape(np.shape(values))


def sign_flips(init: np.ndarray, final: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
    """(surviving weights whose sign in ``final`` differs from ``init``, surviving weights)."""
    m = np.asarray(mask, bool)
    flipped = np.sign(np.asarray(final)[m]) != np.sign(np.asarray(init)[m])
    return int(np.count_nonzero(flipped)), int(m.sum())


def sign_flip_fraction(init: np.ndarray, final: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the surviving weights (``mask``) whose sign changed from ``init`` to ``final``."""
    f, n = sign_flips(init, final, mask)
    return f / n if n else float("nan")


def _leaves(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in flat}


def _layer_overlap(a: dict, b: dict, layers: list[str]) -> dict[str, float]:
    """Jaccard per layer and over all ``layers`` of two ``{layer: mask}`` dicts."""
    out = {layer: jaccard(a[layer], b[layer]) for layer in layers}
    inter = sum(np.count_nonzero(a[k] & b[k]) for k in layers)
    union = sum(np.count_nonzero(a[k] | b[k]) for k in layers)
    out[ALL] = inter / union if union else 1.0
    return out


class _Run:
    """One run folder's ticket masks, init and trained weights, by seed and level."""

    def __init__(self, run: Path, say=None):
        from lth.store import RunStore, StoreError, load_tree, read_hparams, read_members_file
        from lth.stored import seed_weights  # the one verifying reader of a stored run

        self.run_id = run.name
        self.masks: dict[int, dict[int, dict]] = {}  # level -> seed -> {layer: bool mask}
        self.arm_masks: dict[int, dict[tuple[str, int], dict]] = {}  # level -> (arm, seed) -> masks of the other arms
        self.final: dict[int, dict[int, dict]] = {}  # level -> seed -> {layer: trained weights}
        self.ever: dict[int, pd.DataFrame] = {}  # level -> ever_active.parquet (static/set/rigl), where stored
        self.layers: list[str] = []
        if not (run / "init.msgpack").is_file():  # nothing to compare with (e.g. a table-only store)
            return
        hp = read_hparams(run / "hparams.json")
        tell = say or _stderr  # what only the mask analysis sees (skipped levels: load_runs says those)
        try:  # verified against MANIFEST.json; entries found by the file's own seeds record
            tree, seeds = seed_weights(RunStore(run.parent, run.name), "init.msgpack", None, hp.get("seeds"))
        except StoreError as e:
            tell(f"skipped the mask analysis of run {run.name}: {e}")
            return
        init = _leaves(tree["params"])
        self.init = {s: {k: v[i] for k, v in init.items()} for i, s in enumerate(seeds)}
        for d in complete_levels(run, say):
            if not all((d / f).is_file() for f in ("members.json", "masks.msgpack", "final.msgpack")):
                continue
            level = int(d.name[len("level_"):])
            members = read_members_file(d / "members.json")
            masks = _leaves(load_tree(d / "masks.msgpack"))
            final = _leaves(load_tree(d / "final.msgpack")["params"])
            if not self.layers:
                sp = pd.read_parquet(d / "sparsity.parquet")
                self.layers = sorted(set(sp.loc[sp["prunable"], "layer"]))
            tickets = {m["seed"]: k for k, m in enumerate(members) if m["arm"] == "ticket" and not m.get("copy")}
            lack = sorted(set(tickets) - set(self.init))
            if lack:
                tell(f"mask analysis of run {run.name}, {d.name}: init.msgpack holds no init for seeds {lack}; "
                    "those seeds are left out")
            tickets = {s: k for s, k in tickets.items() if s in self.init}
            self.masks[level] = {s: {n: masks[n][k].astype(bool) for n in self.layers} for s, k in tickets.items()}
            self.arm_masks[level] = {(m["arm"], m["seed"]): {n: masks[n][k].astype(bool) for n in self.layers}
                                     for k, m in enumerate(members)
                                     if m["arm"] != "ticket" and not m.get("copy") and m["seed"] in tickets}
            self.final[level] = {s: {n: final[n][k] for n in self.layers} for s, k in tickets.items()}
            if (d / "ever_active.parquet").is_file():
                self.ever[level] = pd.read_parquet(d / "ever_active.parquet")


def _stderr(msg: str) -> None:
    import sys
    print(f"lth: {msg}", file=sys.stderr)


def ticket_table(run: _Run) -> pd.DataFrame:
    """Per (seed, level, layer): density, kept, jaccard_prev_level, jaccard_oneshot_init,
    jaccard_oneshot_trained, jaccard_random, sign_flip (see :func:`mask_analysis`)."""
    rows = []
    dense = run.final.get(0, {})
    for level in sorted(run.masks):
        for seed, mask in run.masks[level].items():
            init = run.init[seed]
            prev = run.masks.get(level - 1, {}).get(seed)
            oneshot_init = {n: topk_mask(init[n], int(mask[n].sum())) for n in run.layers}
            ov_prev = _layer_overlap(prev, mask, run.layers) if prev is not None else {}
            ov_init = _layer_overlap(oneshot_init, mask, run.layers)
            ov_trained = {}
            if seed in dense:
                oneshot_trained = {n: topk_mask(dense[seed][n], int(mask[n].sum())) for n in run.layers}
                ov_trained = _layer_overlap(oneshot_trained, mask, run.layers)
            flips = {n: sign_flips(init[n], run.final[level][seed][n], mask[n]) for n in run.layers}
            flips[ALL] = tuple(map(sum, zip(*flips.values())))
            sizes = {n: mask[n].size for n in run.layers}
            kept = {n: int(mask[n].sum()) for n in run.layers}
            sizes[ALL], kept[ALL] = sum(sizes.values()), sum(kept.values())
            for layer in [*run.layers, ALL]:
                d = kept[layer] / sizes[layer]
                rows.append({"run_id": run.run_id, "seed": seed, "level": level, "layer": layer, "density": d,
                             "kept": kept[layer], "jaccard_prev_level": ov_prev.get(layer, np.nan),
                             "jaccard_oneshot_init": ov_init[layer],
                             "jaccard_oneshot_trained": ov_trained.get(layer, np.nan),
                             "jaccard_random": random_jaccard(d),
                             "sign_flip": flips[layer][0] / flips[layer][1] if flips[layer][1] else np.nan})
    return pd.DataFrame(rows)


def arm_table(run: _Run) -> pd.DataFrame:
    """Per (seed, level, arm, layer): the arm's (final) mask against the same seed's ticket: ``density``,
    ``jaccard_ticket`` and chance ``jaccard_random`` (two independent random masks of densities p and q:
    ``pq / (p + q - pq)``). For set/rigl the mask is the one they ended training with; ``ever_active``: the
    fraction of the layer's weights active at any step of the level's training (``ever_active.parquet``;
    an arm whose mask never moves: its density; set/rigl of a store without that file: NaN)."""
    rows = []
    for level in sorted(run.arm_masks):
        for (arm, seed), mask in run.arm_masks[level].items():
            ticket = run.masks[level][seed]
            ov = _layer_overlap(mask, ticket, run.layers)
            ever = _ever_counts(run.ever.get(level), arm, seed)
            for layer in [*run.layers, ALL]:
                names = run.layers if layer == ALL else [layer]
                size = sum(mask[n].size for n in names)
                p = sum(int(mask[n].sum()) for n in names) / size
                q = sum(int(ticket[n].sum()) for n in names) / size
                if ever is not None:
                    e = sum(ever.get(n, np.nan) for n in names) / size
                else:
                    e = np.nan if arm in MOVING_ARMS else p
                rows.append({"run_id": run.run_id, "seed": seed, "level": level, "arm": arm, "layer": layer,
                             "density": p, "jaccard_ticket": ov[layer],
                             "jaccard_random": p * q / (p + q - p * q) if p + q else np.nan,
                             "ever_active": e})
    return pd.DataFrame(rows)


def _ever_counts(table: pd.DataFrame | None, arm: str, seed: int) -> dict[str, int] | None:
    """``{layer: weights ever active}`` of (arm, seed, copy 0) in a level's ``ever_active.parquet``, or None."""
    if table is None:
        return None
    rows = table[(table["arm"] == arm) & (table["seed"] == seed) & (table["copy"] == 0)]
    return dict(zip(rows["layer"], rows["ever"].astype(int))) if len(rows) else None


def seed_table(run: _Run) -> pd.DataFrame:
    """Per (level, layer, seed_a < seed_b): Jaccard of the two seeds' ticket masks."""
    rows = []
    for level in sorted(run.masks):
        by_seed = run.masks[level]
        for a, b in combinations(sorted(by_seed), 2):
            for layer, j in _layer_overlap(by_seed[a], by_seed[b], run.layers).items():
                rows.append({"run_id": run.run_id, "level": level, "layer": layer, "seed_a": a, "seed_b": b,
                             "jaccard": j})
    return pd.DataFrame(rows)


def level_table(run: _Run) -> pd.DataFrame:
    """Per (seed, level_a < level_b, layer): Jaccard of one seed's ticket masks at two levels."""
    rows = []
    levels = sorted(run.masks)
    for a, b in combinations(levels, 2):
        for seed in sorted(set(run.masks[a]) & set(run.masks[b])):
            for layer, j in _layer_overlap(run.masks[a][seed], run.masks[b][seed], run.layers).items():
                rows.append({"run_id": run.run_id, "seed": seed, "level_a": a, "level_b": b, "layer": layer,
                             "jaccard": j})
    return pd.DataFrame(rows)


def load_earlybird(root: str | Path) -> pd.DataFrame:
    """Every run's ``level_000/earlybird.parquet`` (run_id, seed, epoch, step, layer, distance); empty
    when no run recorded one (stores written before it existed)."""
    frames = []
    for run in _runs(root):
        d = run / "level_000"
        if (d / "earlybird.parquet").is_file() and d in complete_levels(run):
            df = pd.read_parquet(d / "earlybird.parquet")
            df.insert(0, "run_id", run.name)
            frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _runs(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise NotAStoreError(f"{root} is not a folder (expected an lth store, e.g. ./runs)")
    return run_dirs(root)


def mask_analysis(root: str | Path, say=None) -> dict[str, pd.DataFrame]:
    """The mask analysis of every run under ``root`` (a store or one run folder), from stored files:

    - ``ticket``: per (run_id, seed, level, layer): ``density``, ``kept``, ``jaccard_prev_level`` (with
      the seed's ticket mask one level earlier), ``jaccard_oneshot_init`` / ``jaccard_oneshot_trained``
      (with the top-k |w| of the init / of the level-0 trained weights, k = the ticket's count in the
      layer), ``jaccard_random`` (``d / (2 - d)``, chance), ``sign_flip`` (fraction of the surviving
      weights whose sign after the level's training differs from init);
    - ``seeds``: per (run_id, level, layer, seed_a, seed_b): ``jaccard``;
    - ``levels``: per (run_id, seed, level_a, level_b, layer): ``jaccard``;
    - ``earlybird``: :func:`load_earlybird`;
    - ``arms``: per (run_id, seed, level, arm, layer) the other arms' masks against the ticket, and the
      fraction of the layer ever active in training (:func:`arm_table`).

    ``layer`` is a prunable leaf (``dense_0/kernel``) or ``'all'`` (every prunable weight together).
    """
    runs = [_Run(r, say) for r in _runs(root)]
    runs = [r for r in runs if r.masks]

    def cat(frames):
        frames = [f for f in frames if not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    return {"ticket": cat(ticket_table(r) for r in runs), "seeds": cat(seed_table(r) for r in runs),
            "levels": cat(level_table(r) for r in runs), "earlybird": load_earlybird(root),
            "arms": cat(arm_table(r) for r in runs)}
