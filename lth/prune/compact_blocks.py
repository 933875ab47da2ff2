"""``lth compact`` for transformers: the physically smaller model of a head/neuron-pruned vit or gpt.

A model that declares multi-head attentions and block MLPs (:attr:`lth.models.Structure.heads`,
:attr:`~lth.models.Structure.mlps`) and has a method ``compacted(heads, hidden) -> Module`` (the same
model with ``heads[attention]`` heads and ``hidden[first MLP layer]`` hidden units in those blocks; the
built-in vit and gpt) is compacted here:

- a head is removed when the mask removed all its rows of the ``out`` kernel (its contribution is then
  exactly 0, whatever its q, k, v hold): its q, k, v kernel columns and biases and its out rows go;
- a hidden unit is removed when the mask removed its row of the second layer, or its column of the first
  layer and its bias (act(0) = 0): its column and bias entry of the first layer, its row of the second go.

Every other parameter is kept as masked (zeros stay). The head width, and so the attention's scale,
stays. A block that lost every head (unit) keeps one zero head (unit), which adds exactly 0, so every
block keeps its layers. The smaller model computes the masked model's function up to the float
rounding of shorter sums.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..models import Structure, structure_of
from .units import node

PyTree = Any
QKV = ("q", "k", "v")


def compactable(model) -> bool:
    """Whether :func:`compact_blocks` can rebuild ``model``: it declares heads or block MLPs and has
    ``compacted``."""
    st = structure_of(model)
    return bool(st.heads or st.mlps) and callable(getattr(model, "compacted", None))


def live_heads(mask: PyTree, attn: str, heads: int) -> np.ndarray:
    """Bool ``[heads]``: heads with a surviving row of the out kernel (the others add exactly 0)."""
    return np.asarray(node(mask, attn)["out"]["kernel"], bool).reshape(heads, -1).any(axis=1)


def live_units(mask: PyTree, layer: str, nxt: str) -> np.ndarray:
    """Bool ``[H]``: hidden units that can still change the output (module docstring)."""
    first = node(mask, layer)
    reads = np.asarray(first["kernel"], bool).any(axis=0)
    if "bias" in first:
        reads |= np.asarray(first["bias"], bool)
    return reads & np.asarray(node(mask, nxt)["kernel"], bool).any(axis=1)


def _keep_one(alive: np.ndarray) -> np.ndarray:
    alive = alive.copy()
    if not alive.any():
        alive[0] = True  # a zero head/unit: adds exactly 0, and the block keeps its layers
    return alive


def compact_blocks(params: PyTree, mask: PyTree, model) -> tuple[Any, PyTree, dict]:
    """(smaller module, its params, what was removed) of ``model`` with the masked ``params``.

    What was removed: ``{"heads": {attention: (kept, of)}, "hidden": {first MLP layer: (kept, of)}}``.
    ValueError when the model cannot be compacted this way (:func:`compactable`).
    """
    st: Structure = structure_of(model)
    if not compactable(model):
        raise ValueError(f"{type(model).__name__} declares no attention heads or block MLPs "
                         "(Structure.heads, Structure.mlps) with a compacted() method")
    small = _masked(params, mask)
    heads, hidden, removed = {}, {}, {"heads": {}, "hidden": {}}
    for attn, n in st.heads:
        keep = _keep_one(live_heads(mask, attn, n))
        a = node(small, attn)
        d = a["q"]["kernel"].shape[1] // n
        cols = np.repeat(keep, d)
        for x in QKV:
            a[x]["kernel"] = a[x]["kernel"][:, cols]
            if "bias" in a[x]:
                a[x]["bias"] = a[x]["bias"][cols]
        a["out"]["kernel"] = a["out"]["kernel"][cols, :]
        heads[attn] = int(keep.sum())
        removed["heads"][attn] = (int(keep.sum()), n)
    for layer, nxt in st.mlps:
        keep = _keep_one(live_units(mask, layer, nxt))
        first, second = node(small, layer), node(small, nxt)
        first["kernel"] = first["kernel"][:, keep]
        if "bias" in first:
            first["bias"] = first["bias"][keep]
        second["kernel"] = second["kernel"][keep, :]
        hidden[layer] = int(keep.sum())
        removed["hidden"][layer] = (int(keep.sum()), len(keep))
    return model.compacted(heads, hidden), small, removed


def _masked(params, mask):
    if isinstance(params, dict):
        return {k: _masked(v, mask[k]) for k, v in params.items()}
    return np.where(np.asarray(mask, bool), np.asarray(params), 0).astype(np.asarray(params).dtype)
