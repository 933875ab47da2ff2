"""`lth speed`: every format computes the dense masked network; rows land in the store and the report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.config import ModelConfig, PruneConfig
from lth.models import build_model
from lth.prune.nm import nm_prune
from lth.quant import layer_program
from lth.speed import FORMATS, Built, SpeedCheckError, Ticket, check_outputs, measure_ticket, time_call
from lth.prune.structured import structured_prune
from lth.train import apply_mask

FAST = {"repeats": 1, "min_time": 0.0, "warmup": 1}


def ticket(model_cfg, shape, prune_cfg, mask_fn, seed=0):
    model = build_model(model_cfg, 10, shape)
    params = jax.tree.map(np.asarray, model.init(jax.random.key(seed), jnp.zeros((1, *shape)))["params"])
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(  # non-zero biases: a forgotten bias changes the outputs
        lambda p, x: (x + rng.normal(size=x.shape) * 0.1).astype(np.float32) if p[-1].key == "bias" else x, params)
    mask = mask_fn(params, rng)
    masked = jax.tree.map(lambda a: np.asarray(a, np.float32), apply_mask(params, mask))
    x = rng.normal(size=(40, *shape)).astype(np.float32)
    return Ticket(model, model_cfg, prune_cfg, masked, mask, {}, shape, 10, x[:32], layer_program(model)), x


def random_mask(params, rng, density=0.3):
    return jax.tree.map(lambda p: rng.random(p.shape) < density if p.ndim > 1 else np.ones(p.shape, bool), params)


def ones(params, rng=None):
    return jax.tree.map(lambda p: np.ones(p.shape, bool), params)


MLP_CFG = ModelConfig(name="mlp", widths=(24, 16))
CONV_CFG = ModelConfig(name="conv2", width=0.125)  # conv 8, conv 8, pool, fc 32, fc 32: fan-ins 27, 72, 512, 32
NM = PruneConfig(granularity="n:m", n=2, m=4, rate=0.5)
NEURON = PruneConfig(granularity="neuron", rate=0.5)
CASES = {
    "mlp-unstructured": (MLP_CFG, (12,), PruneConfig(), random_mask),
    "conv2-unstructured": (CONV_CFG, (8, 8, 3), PruneConfig(), random_mask),
    "mlp-2:4": (MLP_CFG, (12,), NM, lambda p, r: nm_prune(p, ones(p), NM)),
    "conv2-2:4": (CONV_CFG, (8, 8, 3), NM, lambda p, r: nm_prune(p, ones(p), NM)),
    "mlp-neuron": (MLP_CFG, (12,), NEURON, lambda p, r: structured_prune(p, ones(p), NEURON, build_model(MLP_CFG, 10, (12,)))),
    "conv2-filter": (CONV_CFG, (8, 8, 3), PruneConfig(granularity="filter", rate=0.5),
                     lambda p, r: structured_prune(p, ones(p), PruneConfig(granularity="filter", rate=0.5),
                                                     build_model(CONV_CFG, 10, (8, 8, 3)))),
}
EXPECTED = {"mlp-unstructured": {"dense", "bcoo", "csr", "int8"}, "conv2-unstructured": {"dense", "bcoo", "csr", "int8"},
            "mlp-2:4": {"dense", "bcoo", "csr", "int8", "nm"}, "conv2-2:4": {"dense", "bcoo", "csr", "int8", "nm"},
            "mlp-neuron": {"dense", "bcoo", "csr", "int8", "compact"},
            "conv2-filter": {"dense", "bcoo", "csr", "int8", "compact"}}


@pytest.mark.parametrize("case", list(CASES))
def test_every_format_computes_the_dense_masked_network(case):
    cfg, shape, pc, mask_fn = CASES[case]
    t, x = ticket(cfg, shape, pc, mask_fn)
    ref = np.asarray(t.model.apply({"params": t.params}, x))
    built = {name: b(t) for name, b in FORMATS.items()}
    assert {n for n, b in built.items() if b is not None} == EXPECTED[case]
    for name, b in built.items():
        if b is None:
            continue
        out = np.asarray(b.fn(x))
        if name == "int8":  # the integer program equals the fake-quant network, not the float one
            assert np.mean(out.argmax(-1) == np.asarray(b.reference(x)).argmax(-1)) >= 0.95
            continue
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * max(1, np.abs(ref).max()), err_msg=name)
        assert b.bytes > 0
    dense, sparse = built["dense"].bytes, built["csr"].bytes
    if case.endswith("unstructured"):  # 30% of the kernels: fewer bytes than dense float32
        assert sparse < dense


def test_a_format_that_computes_something_else_is_refused():
    t, x = ticket(MLP_CFG, (12,), PruneConfig(), random_mask)
    dense = FORMATS["dense"](t)
    wrong = Built(lambda x: np.asarray(dense.fn(x)) * 1.01, 1)
    with pytest.raises(SpeedCheckError, match="format broken: outputs differ"):
        check_outputs("broken", wrong, dense, x)


def test_measure_ticket_rows_and_timing():
    t, x = ticket(MLP_CFG, (12,), NM, lambda p, r: nm_prune(p, ones(p), NM))
    rows = measure_ticket(t, x, (1, 8), formats=["nm", "csr"], **FAST)
    assert {(r["format"], r["batch"]) for r in rows} == {(f, b) for f in ("dense", "nm", "csr") for b in (1, 8)}
    for r in rows:
        assert r["latency_s"] > 0 and r["throughput"] == pytest.approx(r["batch"] / r["latency_s"])
        assert r["speedup"] == pytest.approx(1.0) if r["format"] == "dense" else r["speedup"] > 0
    r = time_call(lambda x: x, 1, repeats=3, min_time=0.001)
    assert r["repeats"] == 3 and r["number"] >= 1 and r["latency_s"] <= r["median_s"]


@pytest.mark.slow
def test_speed_cli_writes_rows_the_analysis_and_report_read(tmp_path, capsys):
    from analysis import crossover, load_speed
    from analysis.report import write_report
    from lth.cli import main
    from lth.lottery import run_lottery
    from helpers import tiny
    cfg = tiny(arms=["ticket"], seeds=[0], train={"steps": 20, "eval_every": 20},
               prune={"levels": 2, "granularity": "n:m", "rate": 0.3})
    store = run_lottery(cfg, tmp_path / "runs")
    args = ["speed", str(store.path), "--levels", "0,2", "--batch", "1,4", "--repeats", "1", "--min-time", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "machine: cpu" in out and "jax" in out and "crossover" in out
    df = load_speed(tmp_path / "runs")
    assert set(df["level"]) == {0, 2} and set(df["batch"]) == {1, 4}
    assert set(df[df["level"] == 2]["format"]) == {"dense", "bcoo", "csr", "int8", "nm"}
    assert "nm" not in set(df[df["level"] == 0]["format"])  # 4:4 is not N:M
    assert df["density"].max() == 1.0 and df["density"].min() == pytest.approx(0.5)
    assert {"jax", "scipy", "cpu", "device", "latency_s", "bytes", "speedup"} <= set(df.columns)
    # a rerun of one batch size replaces its rows and keeps the others
    assert main(args[:4] + ["--batch", "4", "--formats", "csr", "--repeats", "1", "--min-time", "0"]) == 0
    again = load_speed(store.path)
    assert len(again) == len(df)
    c = crossover(df)
    assert set(c["format"]) == {"bcoo", "csr", "int8", "nm"} and "crossover_density" in c
    made = write_report(tmp_path / "runs", tmp_path / "fig")
    assert "latency_vs_density" in made and (tmp_path / "fig" / "speed.md").is_file()
    assert "crossover" in (tmp_path / "fig" / "README.md").read_text()
    assert main(["speed", str(store.path), "--levels", "7"]) == 2
    assert "not complete" in capsys.readouterr().err
    assert main(["speed", str(store.path), "--formats", "sparse"]) == 2
    assert "unknown format" in capsys.readouterr().err


def test_sparse_products_in_row_chunks_give_the_same_outputs(monkeypatch):
    import lth.speed
    monkeypatch.setattr(lth.speed, "CHUNK_BYTES", 4096)  # a few patch rows per chunk (memory bound of big convs)
    for case in ("conv2-unstructured", "conv2-2:4"):
        cfg, shape, pc, mask_fn = CASES[case]
        t, x = ticket(cfg, shape, pc, mask_fn)
        ref = np.asarray(t.model.apply({"params": t.params}, x))
        for name in ("bcoo", "nm"):
            b = FORMATS[name](t)
            if b is not None:
                np.testing.assert_allclose(np.asarray(b.fn(x)), ref, rtol=1e-4, atol=1e-4, err_msg=f"{case} {name}")
