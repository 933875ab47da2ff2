"""The byte-level GPT and text data: causal mask, split by position, LM metrics, exact masks, population."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_gpt_lottery

from lth.config import DataConfig, ModelConfig, TrainConfig
from lth.data import DataError, load_dataset, split_by_position
from lth.lottery import run_lottery
from lth.models import build_model, check_output_width, layer_kinds, structure_of
from lth.stored import StoredRun
from lth.train import Engine, lm_metrics, make_batch_fn, stack, unstack

TINY_GPT = ModelConfig(name="gpt", depth=1, dim=16, heads=2, mlp_ratio=2.0)


@pytest.fixture
def corpus(tmp_path):
    return _write_corpus(tmp_path)


def _write_corpus(tmp_path):
    """A small UTF-8 corpus (real words, repeated with variation) as a file."""
    words = "the lottery ticket hypothesis says dense networks contain sparse subnetworks that train well é".split()
    rng = np.random.default_rng(0)
    text = " ".join(words[i] for i in rng.integers(0, len(words), 1500)) + "\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def text_data(path, context=8):
    load_dataset.cache_clear()
    return load_dataset(DataConfig(name="text", path=str(path), context=context))


def test_causal_mask_position_t_never_sees_t_plus_1():
    model = build_model(TINY_GPT, 256, (12,))
    x = np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.float32)
    params = model.init(jax.random.key(0), jnp.zeros((1, 12)))["params"]
    apply = jax.jit(model.apply)
    base = np.asarray(apply({"params": params}, x))
    assert base.shape == (2, 12, 256)
    for t in (0, 4, 10):
        y = x.copy()
        y[:, t + 1] = (y[:, t + 1] + 7) % 256
        out = np.asarray(apply({"params": params}, y))
        np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])  # the past never sees the future
        assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-4  # the change does reach later positions


def test_split_by_position_covers_the_bytes_without_overlap(corpus):
    raw = np.frombuffer(corpus.read_bytes(), np.uint8)
    tr, va, te = split_by_position(len(raw))
    assert (tr.start, tr.stop, va.stop, te.stop) == (0, va.start, te.start, len(raw))
    assert tr.stop < va.stop < te.stop
    d = text_data(corpus, context=8)
    T = 8
    np.testing.assert_array_equal(d.train_tokens, raw[tr])
    i = 37
    np.testing.assert_array_equal(d.x_train[i], raw[i:i + T])
    np.testing.assert_array_equal(d.y_train[i], raw[i + 1:i + T + 1])
    assert len(d.x_train) == tr.stop - T  # every window start whose next byte is still train
    assert d.x_train.base is not None  # zero-copy views, not N x T copies
    # val/test: fixed non-overlapping windows inside their own part
    np.testing.assert_array_equal(d.x_val.ravel(), raw[va][:d.x_val.size])
    np.testing.assert_array_equal(d.y_test.ravel(), raw[te][1:d.y_test.size + 1])
    assert d.num_classes == 256 and d.input_shape == (T,)
    # the engine's batch gather from the resident stream equals the windows
    idx = jnp.asarray([0, 5, len(d.x_train) - 1], jnp.int32)
    x, y = make_batch_fn(None, T)(None, jnp.asarray(d.train_tokens), None, idx, None)
    np.testing.assert_array_equal(np.asarray(x), d.x_train[np.asarray(idx)])
    np.testing.assert_array_equal(np.asarray(y), d.y_train[np.asarray(idx)])


def test_text_errors_are_one_line(tmp_path):
    load_dataset.cache_clear()
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset(DataConfig(name="text"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(DataConfig(name="text", path=str(bad)))
    small = tmp_path / "small.txt"
    small.write_text("x" * 100)
    with pytest.raises(DataError, match="too few for data.context"):
        load_dataset(DataConfig(name="text", path=str(small), context=64))
    with pytest.raises(ValueError, match="model.context = 4 is shorter than the data's windows"):
        build_model(ModelConfig(name="gpt", context=4, dim=16, heads=2), 256, (8,))
    with pytest.raises(ValueError, match=r"needs token windows \[T\]"):
        build_model(TINY_GPT, 10, (28, 28, 1))


def test_pystdlib_fingerprint_records_python_version():
    import platform

    load_dataset.cache_clear()
    d = load_dataset(DataConfig(name="pystdlib", context=64))
    fp = d.fingerprint
    assert fp["python"] == platform.python_version() and fp["files"] > 10
    assert fp["train_bytes"] + d.x_val.size + d.x_test.size <= 2 * 2**20 + 2 * 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT trained with AdamW, clipping and warmup + cosine: seeds [0, 1] together and seed 1 alone."""
    d = text_data(_write_corpus(tmp_path_factory.mktemp("text")))
    model = build_model(TINY_GPT, d.num_classes, d.input_shape)
    check_output_width(model, d.num_classes, d.input_shape)
    cfg = TrainConfig(optimizer="adamw", lr=3e-3, batch_size=8, steps=6, eval_every=3, clip_norm=1.0,
                      warmup_steps=2, schedule="cosine", weight_decay=0.01)
    engine = Engine(model, d, cfg)
    seeds = [0, 1]
    params = [model.init(jax.random.key(s), jnp.zeros((1, *d.input_shape)))["params"] for s in seeds]
    rng = np.random.default_rng(1)
    masks = [jax.tree.map(lambda p: rng.random(p.shape) < 0.6, p) for p in params]
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    together = engine.run(engine.init(stack(params), {}, stack(masks), keys), seeds)
    alone = engine.run(engine.init(stack(params[1:]), {}, stack(masks[1:]), keys[1:]), seeds[1:])
    return d, model, together, alone


def test_lm_metrics_are_exp_and_log2_of_mean_token_loss(trained):
    d, model, _, result = trained
    rows = [r for r in result.records if r["split"] in ("val", "test")]
    assert rows
    for r in rows:
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)
        assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2), rel=1e-12)
    # the val loss is the mean next-token loss over every position of the fixed val windows
    final = unstack(result.state.params, 0)
    logits = jax.jit(model.apply)({"params": final}, d.x_val)
    direct = float(optax.softmax_cross_entropy_with_integer_labels(logits, d.y_val).mean())
    last_val = [r for r in rows if r["split"] == "val"][-1]
    assert last_val["loss"] == pytest.approx(direct, rel=1e-5)
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == d.y_val))
    assert last_val["accuracy"] == pytest.approx(acc, abs=1e-6)  # per token
    assert lm_metrics(math.log(2)) == {"perplexity": pytest.approx(2.0), "bits_per_byte": pytest.approx(1.0)}


def test_population_equals_alone(trained):
    _, _, together, alone = trained
    for a, b in zip(jax.tree.leaves(unstack(together.state.params, 1)), jax.tree.leaves(unstack(alone.state.params, 0))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([r["loss"] for r in together.records if r["member"] == 1],
                               [r["loss"] for r in alone.records], rtol=1e-5)
    assert not np.allclose(together.records[0]["loss"], together.records[1]["loss"])  # the members differ


def test_lottery_keeps_pruned_attention_and_mlp_weights_exactly_zero(corpus, tmp_path):
    cfg = tiny_gpt_lottery(corpus)
    load_dataset.cache_clear()
    store = run_lottery(cfg, tmp_path / "runs")
    run = StoredRun.open(store.path)
    pop = run.population(1)
    kinds = layer_kinds(unstack(pop.params, 0), structure_of(run.model))
    checked = 0
    for k, (arm, _) in enumerate(pop.members):
        params, masks = unstack(pop.params, k), unstack(pop.masks, k)
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        for (path, p), m, kind in zip(flat, jax.tree.leaves(masks), jax.tree.leaves(kinds)):
            name = "/".join(str(getattr(q, "key", q)) for q in path)
            if kind == "dense":  # attn q/k/v/out and mlp in/out kernels
                assert ("attn" in name or "mlp" in name) and name.endswith("kernel")
                assert np.all(np.asarray(p)[~m] == 0.0) and not np.any(np.signbit(np.asarray(p)[~m]))
                assert m.mean() == pytest.approx(0.5, abs=0.02)
                checked += 1
            else:  # embeddings, norms, head, biases: never pruned
                assert m.all(), name
    assert checked == 2 * 6
    metrics = run.metrics(1)
    assert {"perplexity", "bits_per_byte"} <= set(metrics.columns)
    # the quant stage runs on the GPT (it once failed to classify the embedding): one row per member
    from lth.quant.stage import quantize_run
    rows = quantize_run(store.path, levels=[1], bits_list=[8], methods=["ptq"])
    assert sorted(rows["arm"]) == ["random_prune", "ticket"] and rows["bits"].eq(8).all()
    assert np.isfinite(rows["accuracy"]).all() and (rows["size_bytes"] > 0).all()
    # PTQ's retry judges a language model by val bits per byte: with tolerance 0 (no calibration is within
    # it) each member keeps the calibration of the lowest val bits per byte
    each = {cal: quantize_run(store.path, levels=[1], bits_list=[4], methods=["ptq"], calibration=(cal,),
                              arms=("ticket",), write=False) for cal in ("minmax", "mse")}
    assert each["minmax"]["val_bits_per_byte"].iloc[0] != each["mse"]["val_bits_per_byte"].iloc[0]
    chosen = quantize_run(store.path, levels=[1], bits_list=[4], methods=["ptq"], calibration=("minmax", "mse"),
                          retry=True, tolerance=0.0, arms=("ticket",), write=False)
    best = min(each, key=lambda cal: each[cal]["val_bits_per_byte"].iloc[0])
    assert chosen["calibration"].iloc[0] == best
    assert chosen["val_bits_per_byte"].iloc[0] == each[best]["val_bits_per_byte"].iloc[0]
    from lth.quant.stage import quant_config, settings_of
    qc = quant_config(bits=[4], method=["ptq"], calibration=["minmax", "mse"], retry=True)
    assert [s.key() for s in settings_of(qc, lm=True)] != [s.key() for s in settings_of(qc)]  # another cell id
    # layer sensitivity judges a language model by bits per byte: drop = bits per byte gained
    from lth.prune.sensitivity import rates_for, sensitivity
    table = sensitivity(store.path, 1, [0.5, 0.05])
    assert (table["metric"] == "bits_per_byte").all()
    np.testing.assert_allclose(table["bits_per_byte"], table["loss"] / math.log(2), rtol=1e-12)
    np.testing.assert_allclose(table["drop"], table["bits_per_byte"] - table["base_bits_per_byte"], rtol=1e-12)
    assert (table[table["density"] == 0.05]["drop"] > 0).any()  # pruning a layer to 5% costs bits
    assert set(rates_for(table, 1e9, 1).values()) == {0.95}  # any loss tolerated: the lowest density


def test_tied_embeddings_drop_the_head():
    shapes, models = {}, {}
    for tie in (False, True):
        models[tie] = model = build_model(ModelConfig(name="gpt", depth=1, dim=16, heads=2, tie_embeddings=tie),
                                          256, (8,))
        shapes[tie] = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8))))["params"]
        assert structure_of(model).output == (() if tie else ("output",))
    assert "output" in shapes[False] and "output" not in shapes[True]
    kinds = {"/".join(str(getattr(q, "key", q)) for q in path): kind for path, kind in
             jax.tree_util.tree_flatten_with_path(layer_kinds(shapes[False], structure_of(models[False])))[0]}
    for name, kind in kinds.items():
        if name.endswith("kernel") and ("/attn/" in name or "/mlp/" in name):
            assert kind == "dense", name
        elif name.endswith("bias") and ("/attn/" in name or "/mlp/" in name):
            assert kind == "bias", name
        else:  # embeddings, layer norms, the head
            assert kind == "frozen", name
    assert set(shapes[False]) - {"output"} == set(shapes[True])


def test_clip_norm_bounds_the_gradient_and_adamw_decay_is_decoupled():
    from lth.train import make_optimizer

    g = {"w": jnp.full((4,), 10.0)}
    tx = make_optimizer(TrainConfig(optimizer="sgd", lr=1.0, clip_norm=0.5))
    u, _ = tx.update(g, tx.init(g), g)
    assert float(optax.tree.norm(u)) == pytest.approx(0.5, rel=1e-6)
    # zero gradient: adam's direction is 0, so the update is the decoupled decay alone, -wd * param
    p, zero = {"w": jnp.asarray([1.0, -2.0, 0.0])}, {"w": jnp.zeros(3)}
    tx = make_optimizer(TrainConfig(optimizer="adamw", weight_decay=0.1))
    u, _ = tx.update(zero, tx.init(p), p)
    np.testing.assert_allclose(np.asarray(u["w"]), [-0.1, 0.2, 0.0], rtol=1e-6)
