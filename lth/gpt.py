"""``gpt``: a decoder-only byte-level transformer (Radford et al. 2018, 2019), registered in :mod:`lth.models`.

Tokens are bytes (vocabulary 256, the data set's ``num_classes``); ``x [B, T]`` (byte values, any
numeric dtype) -> logits ``[B, T, 256]``, position t's logits predicting byte t + 1. Learned token and
position embeddings, ``model.depth`` pre-LN blocks ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` with
causal multi-head self-attention (Vaswani et al. 2017, Eq. 1, masked so position t attends to
positions <= t) and a GELU MLP of ``mlp_ratio * dim`` hidden units, a final layer norm and the
``output`` head (or, with ``model.tie_embeddings``, the transposed token embedding).

Every projection is a ``Dense`` layer (``block_i/attn/{q,k,v,out}``, ``block_i/mlp/{in,out}``), so
masks, quantization and export see ordinary kernels; the embeddings, layer norms and the head are
declared frozen (:class:`lth.models.Structure`): by default only attention and MLP weights are pruned.
The width multiplier scales the head dimension (``dim / heads``), so ``dim`` stays a multiple of ``heads``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import ModelConfig
from .models import INITS, OUTPUT, Structure, register, scale_width


def _dense(features: int, init: str, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=INITS[init](), bias_init=nn.initializers.zeros, name=name)


def causal_mask(t: int) -> jax.Array:
    """``[T, T]`` bools: query position i may attend to key position j iff j <= i."""
    return jnp.tril(jnp.ones((t, t), bool))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask: ``[B, T, D] -> [B, T, D]``; Dense ``q, k, v, out``."""

    dim: int
    heads: int
    init_scheme: str = "glorot_normal"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        hd = self.dim // self.heads
        q, k, v = (_dense(self.dim, self.init_scheme, n)(x).reshape(b, t, self.heads, hd) for n in ("q", "k", "v"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd))
        # a finite fill: a fully masked row cannot occur (j = i is always allowed), and no inf - inf NaNs
        scores = jnp.where(causal_mask(t), scores, jnp.finfo(scores.dtype).min)
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, self.dim)
        return _dense(self.dim, self.init_scheme, "out")(y)


class MLPBlock(nn.Module):
    """``Dense in`` (hidden units), GELU, ``Dense out``: ``[B, T, D] -> [B, T, D]``."""

    dim: int
    hidden: int
    init_scheme: str = "glorot_normal"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _dense(self.dim, self.init_scheme, "out")(nn.gelu(_dense(self.hidden, self.init_scheme, "in")(x)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    dim: int
    heads: int
    hidden: int
    init_scheme: str = "glorot_normal"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + CausalSelfAttention(self.dim, self.heads, self.init_scheme, name="attn")(nn.LayerNorm(name="ln_1")(x))
        return x + MLPBlock(self.dim, self.hidden, self.init_scheme, name="mlp")(nn.LayerNorm(name="ln_2")(x))


class GPT(nn.Module):
    """Decoder-only byte-level transformer: ``x [B, T]`` -> logits ``[B, T, vocab]`` (module doc)."""

    vocab: int
    context: int
    depth: int
    dim: int
    heads: int
    hidden: int
    tie_embeddings: bool = False
    init_scheme: str = "glorot_normal"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        tokens = x.astype(jnp.int32)
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"gpt: a window of {t} tokens is longer than model.context = {self.context}")
        embed = nn.Embed(self.vocab, self.dim, embedding_init=nn.initializers.normal(0.02), name="embed")
        pos = nn.Embed(self.context, self.dim, embedding_init=nn.initializers.normal(0.02), name="pos_embed")
        h = embed(tokens) + pos(jnp.arange(t))[None]
        for i in range(self.depth):
            h = Block(self.dim, self.heads, self.hidden, self.init_scheme, name=f"block_{i}")(h)
        h = nn.LayerNorm(name="ln_f")(h)
        if self.tie_embeddings:
            return embed.attend(h)
        return _dense(self.vocab, self.init_scheme, OUTPUT)(h)

    def structure(self) -> Structure:
        """Not a chain; the embeddings, every layer norm and the head are frozen (never pruned nor quantized)."""
        norms = tuple(f"block_{i}/{n}" for i in range(self.depth) for n in ("ln_1", "ln_2"))
        head = () if self.tie_embeddings else (OUTPUT,)
        return Structure(output=head, frozen=("embed", "pos_embed", *norms, "ln_f", *head))


@register("gpt")
def gpt(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The byte-level GPT of ``cfg`` for windows ``input_shape = (T,)``; ``num_classes`` is the vocabulary."""
    if len(input_shape) != 1:
        raise ValueError(f"model gpt needs token windows [T] (data.name = 'text' or 'pystdlib'); the data set "
                         f"gives inputs of shape {input_shape}")
    context = cfg.context or input_shape[0]
    if input_shape[0] > context:
        raise ValueError(f"model.context = {cfg.context} is shorter than the data's windows (data.context = "
                         f"{input_shape[0]}); raise model.context or set it to 0 (the data's window)")
    if cfg.dim % cfg.heads:
        raise ValueError(f"model.dim = {cfg.dim} is not a multiple of model.heads = {cfg.heads}; "
                         "choose dim = heads * head size")
    head_dim = scale_width(cfg.dim // cfg.heads, cfg.width)
    dim = head_dim * cfg.heads
    return GPT(vocab=num_classes, context=context, depth=cfg.depth, dim=dim, heads=cfg.heads,
               hidden=scale_width(round(cfg.mlp_ratio * cfg.dim), cfg.width), tie_embeddings=cfg.tie_embeddings,
               init_scheme=cfg.init)
