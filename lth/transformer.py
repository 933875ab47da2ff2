"""Transformer building blocks (Flax linen): self-attention, feed-forward and pre-LN blocks.

Every matmul with weights is a named ``nn.Dense`` with a ``kernel``, so masking, the quant stage's
fake-quant wiring and export see attention and MLP layers as they see any dense layer:

- :class:`SelfAttention`: ``q``, ``k``, ``v`` (``[dim, heads * head_dim]``, head ``h`` owns output
  columns ``h * head_dim .. (h + 1) * head_dim``) and ``out`` (``[heads * head_dim, dim]``, head ``h``
  owns the same input rows); softmax attention of Vaswani et al. (2017), Eq. 1, per head, optionally
  causal (position t attends to positions <= t).
- :class:`FeedForward`: ``fc_in`` (``[dim, hidden]``), GELU, ``fc_out`` (``[hidden, dim]``).
- :class:`Block`: pre-LN residual block (Xiong et al. 2020): ``x + attn(ln_0(x))``, then
  ``x + mlp(ln_1(x))``.

The layer names are fields (``names`` of :class:`FeedForward`, ``norms`` and ``mlp_names`` of
:class:`Block`) so that a model keeps the parameter names its stored runs were written with: the vit
uses the defaults, the gpt ``ln_1``/``ln_2`` and ``mlp/{in, out}``.
- :class:`Embedding`: a learned table (position embeddings, a CLS token).

Models built from them (``vit``, ``gpt``) live in :mod:`lth.models`, which declares their structure.

Kernel inits are named as in :data:`lth.models.INITS` (``glorot_normal``, ``kaiming_normal``: both
``flax.linen.initializers`` names); biases start at 0. This module imports nothing of lth.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

def dense(features: int, init: str, name: str) -> nn.Dense:
    """A Dense with the named kernel init (an ``nn.initializers`` factory) and zero bias."""
    return nn.Dense(features, kernel_init=getattr(nn.initializers, init)(), bias_init=nn.initializers.zeros,
                    name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention ``[B, T, dim] -> [B, T, out_dim]`` with ``heads`` heads of ``head_dim``."""

    heads: int
    head_dim: int
    out_dim: int
    init_scheme: str = "glorot_normal"
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        inner = self.heads * self.head_dim
        split = lambda y: y.reshape(b, t, self.heads, self.head_dim)  # noqa: E731
        q = split(dense(inner, self.init_scheme, "q")(x))
        k = split(dense(inner, self.init_scheme, "k")(x))
        v = split(dense(inner, self.init_scheme, "v")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
        if self.causal:
            logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, inner)
        return dense(self.out_dim, self.init_scheme, "out")(y)


class FeedForward(nn.Module):
    """``fc_out(gelu(fc_in(x)))``: ``[..., dim] -> [..., dim]`` through ``hidden`` units; ``names``: the
    two Dense layers' names (in, out)."""

    hidden: int
    init_scheme: str = "glorot_normal"
    names: tuple[str, str] = ("fc_in", "fc_out")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.gelu(dense(self.hidden, self.init_scheme, self.names[0])(x))
        return dense(x.shape[-1], self.init_scheme, self.names[1])(h)


class Block(nn.Module):
    """Pre-LN transformer block: submodules ``ln_0``, ``attn`` (:class:`SelfAttention`), ``ln_1``,
    ``mlp`` (:class:`FeedForward` with layers ``mlp_names``); ``norms`` renames the two layer norms."""

    heads: int
    head_dim: int
    hidden: int
    init_scheme: str = "glorot_normal"
    causal: bool = False
    norms: tuple[str, str] = ("ln_0", "ln_1")
    mlp_names: tuple[str, str] = ("fc_in", "fc_out")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + SelfAttention(self.heads, self.head_dim, x.shape[-1], self.init_scheme, self.causal,
                              name="attn")(nn.LayerNorm(name=self.norms[0])(x))
        return x + FeedForward(self.hidden, self.init_scheme, self.mlp_names,
                               name="mlp")(nn.LayerNorm(name=self.norms[1])(x))


class Embedding(nn.Module):
    """A learned table ``embedding`` of ``shape`` (N(0, 0.02^2) entries, or zeros), returned as is."""

    shape: tuple[int, ...]
    zeros: bool = False

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.initializers.zeros if self.zeros else nn.initializers.normal(0.02)
        return self.param("embedding", init, self.shape)
