"""Attention-head pruning (``prune.granularity = "head"``): whole heads of the multi-head attentions a
model declares (:attr:`lth.models.Structure.heads`), as in Michel et al. (2019), ranked here by the
norm of the head's weights.

Head h of an attention with heads of width d owns the output columns ``h * d .. (h + 1) * d`` of its
``q``, ``k`` and ``v`` kernels (and biases) and the same input rows of its ``out`` kernel; removing it
masks all of them, so its contribution to the block's output is exactly zero. Each level removes
``round_half_up(rate * alive)`` of every attention's surviving heads (the rate of its layer or kind
in ``prune.rates``, else ``prune.rate``); the head with the smallest norm goes first (ties: lower index).
Pure functions on one member's pytrees.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..config import PruneConfig
from ..models import Structure
from .masks import named_rate
from .units import copy_masks, node as _node

PyTree = Any
QKV = ("q", "k", "v")


def check_heads(params: PyTree, st: Structure) -> None:
    """ValueError unless every declared attention has q, k, v, out kernels that split into its heads."""
    for attn, n in st.heads:
        try:
            node = _node(params, attn)
            shapes = [tuple(node[x]["kernel"].shape) for x in (*QKV, "out")]
        except (KeyError, TypeError):
            raise ValueError(f"the declared attention {attn!r} has no q, k, v and out Dense kernels") from None
        if len({s[1] for s in shapes[:3]} | {shapes[3][0]}) != 1 or shapes[3][0] % n:
            raise ValueError(f"the declared attention {attn!r} has q, k, v, out kernels {shapes} that do not "
                             f"split into {n} heads")


def head_width(mask_or_params: PyTree, attn: str, heads: int) -> int:
    return _node(mask_or_params, attn)["q"]["kernel"].shape[1] // heads


def alive_heads(mask: PyTree, attn: str, heads: int) -> np.ndarray:
    """Bool ``[heads]``: which heads of ``attn`` still have a surviving out-projection row."""
    out = np.asarray(_node(mask, attn)["out"]["kernel"], bool)
    return out.reshape(heads, -1).any(axis=1)


def head_scores(params: PyTree, mask: PyTree, attn: str, heads: int, norm: str) -> np.ndarray:
    """``[heads]`` l1 or l2 norm of each head's surviving q, k, v columns and out rows."""
    node, mnode = _node(params, attn), _node(mask, attn)
    d = head_width(params, attn, heads)
    total = np.zeros(heads)
    for x in (*QKV, "out"):
        w = np.asarray(node[x]["kernel"], np.float64) * np.asarray(mnode[x]["kernel"], bool)
        w = w.T if x != "out" else w  # [inner, fan]: head h owns rows h*d..(h+1)*d
        per = w.reshape(heads, d * w.shape[1])
        total += np.abs(per).sum(1) if norm == "l1" else (per ** 2).sum(1)
    return total if norm == "l1" else np.sqrt(total)


def remove_heads(mask: dict, attn: str, heads: int, drop) -> dict:
    """Copy of ``mask`` with heads ``drop`` of ``attn`` removed (q, k, v columns and biases, out rows)."""
    mask = copy_masks(mask)
    node = _node(mask, attn)
    d = head_width(mask, attn, heads)
    for h in drop:
        cols = slice(int(h) * d, (int(h) + 1) * d)
        for x in QKV:
            node[x]["kernel"][:, cols] = False
            if "bias" in node[x]:
                node[x]["bias"][cols] = False
        node["out"]["kernel"][cols, :] = False
    return mask


def head_prune(params: PyTree, mask: PyTree, cfg: PruneConfig, st: Structure) -> PyTree:
    """Next mask: remove the lowest-norm surviving heads of every declared attention (not excluded)."""
    new = copy_masks(mask)
    for attn, heads in st.heads:
        parts = attn.split("/")
        if any(p in cfg.exclude or "/".join(parts[:i + 1]) in cfg.exclude for i, p in enumerate(parts)):
            continue
        rate = named_rate(cfg, attn, st)
        rate = cfg.rate if rate is None else rate
        alive = alive_heads(new, attn, heads)
        n_drop = int(math.floor(rate * alive.sum() + 0.5))
        if n_drop == 0:
            continue
        scores = np.where(alive, head_scores(params, new, attn, heads, cfg.structure_norm), np.inf)
        new = remove_heads(new, attn, heads, np.argsort(scores, kind="stable")[:n_drop])
    return new
