"""The gpt and vit share lth.transformer's blocks; settings of one model family set on another are refused."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.config import ModelConfig
from lth.models import build_model


# ---- the gpt's blocks as they were before it used lth.transformer (a stored run's params tree) ----

def _dense(features, name):
    return nn.Dense(features, kernel_init=nn.initializers.glorot_normal(), bias_init=nn.initializers.zeros, name=name)


class _OldAttention(nn.Module):
    dim: int
    heads: int

    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        hd = self.dim // self.heads
        q, k, v = (_dense(self.dim, n)(x).reshape(b, t, self.heads, hd) for n in ("q", "k", "v"))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd))
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(s.dtype).min)
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, self.dim)
        return _dense(self.dim, "out")(y)


class _OldMLP(nn.Module):
    dim: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        return _dense(self.dim, "out")(nn.gelu(_dense(self.hidden, "in")(x)))


class _OldBlock(nn.Module):
    dim: int
    heads: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        x = x + _OldAttention(self.dim, self.heads, name="attn")(nn.LayerNorm(name="ln_1")(x))
        return x + _OldMLP(self.dim, self.hidden, name="mlp")(nn.LayerNorm(name="ln_2")(x))


class _OldGPT(nn.Module):
    vocab: int
    context: int
    depth: int
    dim: int
    heads: int
    hidden: int

    @nn.compact
    def __call__(self, x, train=False):
        tokens = x.astype(jnp.int32)
        embed = nn.Embed(self.vocab, self.dim, embedding_init=nn.initializers.normal(0.02), name="embed")
        pos = nn.Embed(self.context, self.dim, embedding_init=nn.initializers.normal(0.02), name="pos_embed")
        h = embed(tokens) + pos(jnp.arange(tokens.shape[1]))[None]
        for i in range(self.depth):
            h = _OldBlock(self.dim, self.heads, self.hidden, name=f"block_{i}")(h)
        return _dense(self.vocab, "output")(nn.LayerNorm(name="ln_f")(h))


def _paths(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_gpt_on_the_shared_blocks_keeps_the_stored_params_tree_and_outputs():
    new = build_model(ModelConfig(name="gpt", depth=2, dim=16, heads=2, mlp_ratio=2.0), 256, (8,))
    old = _OldGPT(vocab=256, context=8, depth=2, dim=16, heads=2, hidden=32)
    x = np.random.default_rng(0).integers(0, 256, (3, 8)).astype(np.float32)
    p_old = jax.jit(old.init)(jax.random.key(3), jnp.zeros((1, 8)))["params"]
    p_new = jax.jit(new.init)(jax.random.key(3), jnp.zeros((1, 8)))["params"]
    assert _paths(p_old) == _paths(p_new)  # a stored gpt run's trees load into the new module
    assert "block_1/mlp/in/kernel" in _paths(p_new) and "block_0/ln_2/scale" in _paths(p_new)
    for a, b in zip(jax.tree.leaves(p_old), jax.tree.leaves(p_new)):
        np.testing.assert_array_equal(a, b)  # the same init draws (flax keys follow the module paths)
    # the same function, bit for bit, on the old module's params
    np.testing.assert_array_equal(jax.jit(new.apply)({"params": p_old}, x), jax.jit(old.apply)({"params": p_old}, x))
    import lth.models

    assert not {"CausalSelfAttention", "MLPBlock", "Block"} & set(vars(lth.models))  # one set: lth.transformer's


def test_transformer_settings_on_other_models_are_one_line_config_errors(tmp_path, capsys):
    from helpers import TINY, toml_text

    from lth.cli import main
    from lth.config import ConfigError, ExperimentConfig, check_model_fields

    exp = tmp_path / "e.toml"
    exp.write_text(toml_text({**TINY, "prune": {**TINY["prune"], "levels": 1}, "arms": ["ticket"]}))
    out = tmp_path / "out"
    assert main(["lottery", str(exp), "--out", str(out), "--set", "model.depth=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lth: error: model.depth = 2 is not used by model.name = 'mlp' (only by 'vit', 'gpt'); remove it"]
    assert not list(out.rglob("level_*"))  # refused before anything trained
    for name, setting, users in (("conv2", {"patch": 2}, "'vit'"), ("vit", {"context": 64}, "'gpt'"),
                                 ("gpt", {"pool": "mean"}, "'vit'"), ("resnet20", {"tie_embeddings": True}, "'gpt'")):
        mc = ModelConfig(name=name, **setting)
        key, v = next(iter(setting.items()))
        with pytest.raises(ConfigError, match=rf"model.{key} = .* is not used by model.name = '{name}' \(only by {users}\)"):
            check_model_fields(mc)
    # defaults are not "set"; each model's own settings pass
    for mc in (ModelConfig(), ModelConfig(name="conv2"), ModelConfig(name="vit", depth=2, patch=2, pool="mean"),
               ModelConfig(name="gpt", depth=1, context=32, tie_embeddings=True)):
        check_model_fields(mc)
    ExperimentConfig(model=ModelConfig(name="mlp", depth=3))  # only the built model's check refuses it


def test_stability_metrics_of_a_language_model_average_over_tokens():
    # lth stability on a gpt: labels [C, n, T]; it once failed to broadcast the examples' validity over tokens
    from helpers import random_params

    from lth.lottery.stability import test_metrics

    model = build_model(ModelConfig(name="gpt", depth=1, dim=8, heads=2, mlp_ratio=1.0), 256, (4,))
    params = random_params(model, (4,))
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 256, (2, 3, 4)).astype(np.float32)
    ys = rng.integers(0, 256, (2, 3, 4)).astype(np.int32)
    valid = np.array([[1, 1, 1], [1, 0, 0]], np.float32)  # 4 real windows, 2 padding
    loss, err = jax.jit(lambda p: test_metrics(model, p, None, xs, ys, valid))(params)
    keep = valid.astype(bool)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, xs[keep]), np.float64)  # [4, T, 256]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, ys[keep][..., None], -1).mean()  # the mean over all 16 tokens
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(err), np.mean(np.argmax(logits, -1) != ys[keep]), rtol=1e-6)


def test_the_speed_crossover_of_a_run_timed_dense_only_has_its_columns():
    # lth report on a transformer run: lth speed times only the dense format there; the report then crashed
    import pandas as pd

    from analysis.speed import crossover

    speed = pd.DataFrame({"run_id": ["a"], "experiment": ["e"], "model": ["gpt"], "member": [0], "format": ["dense"],
                          "batch": [8], "density": [0.5], "speedup": [1.0]})
    c = crossover(speed)
    assert c.empty and {"crossover_density", "first_faster_density", "best_at_density"} <= set(c.columns)
