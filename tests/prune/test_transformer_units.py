"""Head and neuron granularity on the vit and the gpt, driven by their declared Structure; compact."""

import jax
import numpy as np
import pytest
from helpers import random_params

from lth.config import ConfigError, ModelConfig, PruneConfig
from lth.models import build_model, structure_of
from lth.prune.heads import alive_heads
from lth.prune.structured import check_granularity, structured_prune
from lth.prune.units import alive_hidden

# depth 2, 4 heads of width 4, 32 hidden units
MODELS = {
    "vit": (ModelConfig(name="vit", patch=4, dim=16, depth=2, heads=4, mlp_ratio=2.0), 4, (8, 8, 1)),
    "gpt": (ModelConfig(name="gpt", dim=16, depth=2, heads=4, mlp_ratio=2.0), 256, (8,)),
}
MLP = {"vit": ("fc_in", "fc_out"), "gpt": ("in", "out")}


def setup(name, seed=1):
    mc, classes, shape = MODELS[name]
    model = build_model(mc, classes, shape)
    params = jax.tree.map(np.array, random_params(model, shape, seed))  # numpy: nothing compiles; nonzero biases
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 256, (3, *shape)) if name == "gpt" else rng.normal(size=(3, *shape))).astype(np.float32)
    return model, params, x


def ones(params):
    return jax.tree.map(lambda p: np.ones(p.shape, bool), params)


def masked(params, mask):
    return jax.tree.map(lambda p, m: np.where(m, p, 0.0).astype(np.float32), params, mask)


@pytest.mark.parametrize("name", ["vit", "gpt"])
def test_pruned_heads_and_hidden_units_no_longer_change_the_output(name):
    model, params, x = setup(name)
    st = structure_of(model)
    assert [a for a, _ in st.heads] == ["block_0/attn", "block_1/attn"]
    fc_in, fc_out = MLP[name]
    assert st.mlps == tuple((f"block_{i}/mlp/{fc_in}", f"block_{i}/mlp/{fc_out}") for i in range(2))
    heads = structured_prune(params, ones(params), PruneConfig(granularity="head", rate=0.25, rates={"attn": 0.5},
                                                               exclude=("block_1",)), model)
    mask = structured_prune(params, heads, PruneConfig(granularity="neuron", rate=0.25, rates={"mlp": 0.3}), model)
    # counts exact: 2 of 4 heads (the rate of kind attn; block_1 excluded), 10 of 32 units (the rate of kind mlp)
    assert [alive_heads(mask, f"block_{i}/attn", 4).sum() for i in range(2)] == [2, 4]
    assert [alive_hidden(mask, f"block_{i}/mlp/{fc_in}").sum() for i in range(2)] == [22, 22]
    attn, mlp = mask["block_0"]["attn"], mask["block_0"]["mlp"]
    assert attn["q"]["kernel"].sum() == 16 * 8 and attn["v"]["bias"].sum() == 8 and attn["out"]["kernel"].sum() == 8 * 16
    assert mlp[fc_in]["kernel"].sum() == 16 * 22 and mlp[fc_in]["bias"].sum() == 22 and mlp[fc_out]["kernel"].sum() == 22 * 16
    assert mlp[fc_out]["bias"].all() and attn["out"]["bias"].all()  # the outputs' biases stay
    others = {k: v for k, v in mask.items() if not k.startswith("block")}
    assert all(np.all(m) for m in jax.tree.leaves(others))  # embeddings, norms, head: untouched
    apply = jax.jit(model.apply)
    want = apply({"params": masked(params, mask)}, x)
    dead_h = np.flatnonzero(~alive_heads(mask, "block_0/attn", 4))
    dead_u = np.flatnonzero(~alive_hidden(mask, f"block_0/mlp/{fc_in}"))
    cols = np.concatenate([np.arange(4 * h, 4 * h + 4) for h in dead_h])
    for poke in ("inputs", "outputs"):  # anything in a removed unit's inputs, or in its outputs: bit for bit the same
        p = masked(params, mask)
        a, m = p["block_0"]["attn"], p["block_0"]["mlp"]
        if poke == "inputs":
            for q in ("q", "k", "v"):
                a[q]["kernel"][:, cols] = 5.0
                a[q]["bias"][cols] = -3.0
            m[fc_in]["kernel"][:, dead_u] = 4.0
            m[fc_in]["bias"][dead_u] = 2.0
        else:
            m[fc_out]["kernel"][dead_u, :] = 7.0
        np.testing.assert_array_equal(apply({"params": p}, x), want)
    # the removal reaches the output: the same poke on a live unit changes it
    p = masked(params, mask)
    alive_u = int(np.flatnonzero(alive_hidden(mask, f"block_0/mlp/{fc_in}"))[0])
    p["block_0"]["mlp"][fc_in]["bias"][alive_u] = 2.0
    assert np.abs(apply({"params": p}, x) - want).max() > 1e-6


def test_neuron_and_head_granularity_are_checked_against_the_declared_structure():
    model, params, _ = setup("gpt")
    for g in ("head", "neuron"):
        check_granularity(PruneConfig(granularity=g, levels=1), model, params, "gpt")
    with pytest.raises(ConfigError, match=r"prune.granularity = 'neuron' prunes nothing in model.name = 'gpt'"):
        check_granularity(PruneConfig(granularity="neuron", levels=1, rates={"mlp": 0.0}), model, params, "gpt")
    with pytest.raises(ConfigError, match=r"prune.granularity = 'filter' is not allowed with model.name = 'gpt'.*"
                                          r"use prune.granularity = 'weight', 'neuron', 'head', 'n:m'"):
        check_granularity(PruneConfig(granularity="filter", levels=1), model, params, "gpt")


@pytest.mark.parametrize("name", ["vit", "gpt"])
def test_compact_builds_the_smaller_transformer_with_the_masked_models_outputs(name):
    from lth.models import param_count
    from lth.prune.compact_blocks import compact_blocks
    from lth.prune.heads import remove_heads

    model, params, x = setup(name, seed=2)
    fc_in, fc_out = MLP[name]
    mask = structured_prune(params, ones(params), PruneConfig(granularity="head", rate=0.5), model)
    mask = remove_heads(mask, "block_1/attn", 4, range(4))  # a block that lost every head keeps one zero head
    mask = structured_prune(params, mask, PruneConfig(granularity="neuron", rate=0.25), model)
    small_model, small, removed = compact_blocks(params, mask, model)
    assert removed == {"heads": {"block_0/attn": (2, 4), "block_1/attn": (1, 4)},
                       "hidden": {f"block_{i}/mlp/{fc_in}": (24, 32) for i in range(2)}}
    a, m = small["block_0"]["attn"], small["block_0"]["mlp"]
    assert a["q"]["kernel"].shape == (16, 8) and a["k"]["bias"].shape == (8,)
    assert a["out"]["kernel"].shape == (8, 16)
    assert m[fc_in]["kernel"].shape == (16, 24) and m[fc_out]["kernel"].shape == (24, 16)
    zero_head = small["block_1"]["attn"]["out"]["kernel"]
    assert zero_head.shape == (4, 16) and not zero_head.any()
    # 5 heads of width 4 (q, k, v columns and biases, out rows) and 2 x 8 units (column, bias, row) went
    assert param_count(small) == param_count(params) - 5 * (3 * 16 * 4 + 3 * 4 + 4 * 16) - 2 * 8 * (16 + 1 + 16)
    got = np.asarray(jax.jit(small_model.apply)({"params": small}, x))
    want = np.asarray(jax.jit(model.apply)({"params": masked(params, mask)}, x))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lth_compact_and_export_on_a_head_pruned_gpt_run(tmp_path, capsys):
    from helpers import tiny

    from lth.cli import main
    from lth.data import load_dataset
    from lth.lottery import run_lottery

    words = "attention heads that nobody reads can go while the rest of the network stays".split()
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(words[i] for i in np.random.default_rng(0).integers(0, len(words), 600)))
    cfg = tiny(seeds=[0], arms=["ticket"],
               data={"name": "text", "path": str(corpus), "context": 8, "val_size": None},
               model={"name": "gpt", "depth": 1, "dim": 8, "heads": 4, "mlp_ratio": 2.0, "widths": [300, 100]},
               train={"optimizer": "adamw", "lr": 3e-3, "batch_size": 8, "steps": 2, "eval_every": 2},
               prune={"levels": 1, "rate": 0.5, "output_rate": None, "granularity": "head"})
    load_dataset.cache_clear()
    store = run_lottery(cfg, tmp_path / "runs")
    assert main(["compact", str(store.path), "--level", "1", "--batch", "4"]) == 0
    out = {k.strip(): v.strip() for k, v in (line.split(": ", 1) for line in capsys.readouterr().out.splitlines())}
    assert out["heads_kept"] == "2/4" and out["hidden_kept"] == "16/16"
    assert int(out["params_compact"]) == int(out["params_masked"]) - 2 * (3 * 8 * 2 + 3 * 2 + 2 * 8)  # 2 heads of 2
    assert float(out["max_abs_diff"]) < 1e-5
    # lth speed times the compact gpt beside the masked one, its outputs checked equal first
    assert main(["speed", str(store.path), "--levels", "1", "--batch", "4", "--formats", "dense,compact",
                 "--repeats", "1", "--min-time", "0.001"]) == 0
    import pandas as pd
    speed = pd.read_parquet(store.level_dir(1) / "speed.parquet").set_index("format")
    assert set(speed.index) == {"dense", "compact"} and speed.loc["compact", "max_abs_diff"] < 1e-5
    assert speed.loc["compact", "bytes"] == speed.loc["dense", "bytes"] - 4 * 2 * (3 * 8 * 2 + 3 * 2 + 2 * 8)
    capsys.readouterr()
    assert main(["compact", str(store.path), "--level", "0"]) == 2  # the dense level: nothing to compact
    assert "has no fully pruned attention head or MLP hidden unit" in capsys.readouterr().err
    # integer export: one line saying it does not apply and what to use instead (before any quantizing)
    assert main(["export", str(store.path), "--level", "1", "--bits", "8", "--out", str(tmp_path / "t.lthq")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lth: error: not supported for model GPT: integer inference")
    assert "use `lth quantize`" in err[0] and not (tmp_path / "t.lthq").exists()


def test_pruning_at_init_scores_and_ranks_only_the_prunable_layers_of_a_gpt(tmp_path):
    # SNIP and SynFlow pooled over the prunable leaves (prune.pai_allocation = "global"): the
    # embeddings, layer norms and head (frozen) and the biases stay whole; the attn and mlp kernels keep
    # exactly the ticket's count between them
    import functools

    from helpers import tiny

    from lth.data import load_dataset
    from lth.lottery import Lottery
    from lth.lottery.arms import ArmStart, pai_mask
    from lth.prune.masks import prunable

    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(np.random.default_rng(0).choice(["ticket", "mask", "head", "unit"], 600)))
    cfg = tiny(seeds=[0], arms=["ticket", "snip", "synflow"],
               data={"name": "text", "path": str(corpus), "context": 4, "val_size": None},
               model={"name": "gpt", "depth": 1, "dim": 8, "heads": 2, "mlp_ratio": 1.0, "widths": [300, 100]},
               train={"optimizer": "adam", "lr": 1e-3, "batch_size": 4, "steps": 2, "eval_every": 2},
               prune={"levels": 1, "rate": 0.5, "output_rate": None, "pai_allocation": "global",
                      "criterion_batches": 1})
    load_dataset.cache_clear()
    lot = Lottery(cfg, tmp_path / "runs")
    params = jax.tree.map(np.array, random_params(lot.model, (4,)))
    can = prunable(params, cfg.prune, lot.structure)
    rng = np.random.default_rng(0)
    ticket = jax.tree.map(lambda p, c: rng.random(p.shape) < 0.5 if c else np.ones(p.shape, bool), params, can)
    want = sum(int(m.sum()) for m, c in zip(jax.tree.leaves(ticket), jax.tree.leaves(can)) if c)
    start = ArmStart({"params": params, "batch_stats": {}}, ticket, can, 0, 1, lot.model, (4,),
                     functools.partial(lot.signals, seed=0, level=1), {})
    names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(can)[0]]
    assert {n for n, c in zip(names, jax.tree.leaves(can)) if c} == {
        f"block_0/{x}/kernel" for x in ("attn/q", "attn/k", "attn/v", "attn/out", "mlp/in", "mlp/out")}
    for criterion in ("snip", "synflow"):  # grasp pools the same way (pai_mask); its compile is the longest
        mask = pai_mask(start, criterion)
        kept = 0
        for name, m, c in zip(names, jax.tree.leaves(mask), jax.tree.leaves(can)):
            assert c or m.all(), (criterion, name)
            kept += int(m.sum()) if c else 0
        assert kept == want, criterion
