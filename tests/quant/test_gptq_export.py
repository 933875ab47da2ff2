"""Integer inference and export of grouped GPTQ models (a scale per group of inputs of a channel)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.quant import QuantSpec
from lth.quant.export import read_export, size_report, write_export
from lth.quant.gptq_net import gptq_population
from lth.quant.intinfer import from_quantized
from lth.quant.wiring import fake_quant_model
from test_intinfer import conv2, mlp  # noqa: F401  (fixtures)


def _gptq(model, params, x, spec, **kw):
    one = jax.tree.map(lambda a: np.asarray(a)[None], params)
    masks = jax.tree.map(lambda a: np.asarray(a) != 0 if np.ndim(a) > 2 else np.ones(np.shape(a), bool), one)
    return gptq_population(model, one, {}, masks, spec, x[:256], **kw)[0]


def _fake_quant_logits(model, qt, x):
    return np.asarray(fake_quant_model(model, qt.spec, "static").apply(qt.variables(), jnp.asarray(x)))


@pytest.mark.parametrize("case,group_size,act_order,scheme", [
    ("mlp", 8, False, "sym"), ("mlp", 6, True, "asym"), ("conv2", 12, False, "asym"), ("conv2", 10, True, "sym")])
def test_grouped_gptq_integer_logits_equal_fake_quant_and_survive_export(case, group_size, act_order, scheme, request,
                                                                          tmp_path):
    model, params, x = request.getfixturevalue(case)
    shape = x.shape[1:]
    qt = _gptq(model, params, x, QuantSpec(4, scheme, act_bits=8), group_size=group_size, act_order=act_order)
    assert all("group_index" in qp for qp in qt.weight_qparams.values())
    im = from_quantized(model, qt, shape, 10)
    x = x[:1000]
    got, want = im.logits(x), _fake_quant_logits(model, qt, x)
    # the integer program sums each group's int32 accumulator at its scale; it equals the fake-quant model
    # up to float32 summation order (and an activation a rounding tie away from the next code)
    close = np.all(np.abs(got - want) <= 1e-3 * (1 + np.abs(want)), axis=1)
    assert close.mean() >= 0.99, close.mean()
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.995
    # the export file stores the groups (and act-order's group of each input) and reads back the same model
    path = tmp_path / "m.lthq"
    write_export(path, im)
    back, header = read_export(path)
    assert all(meta["groups"] == np.shape(qt.weight_qparams[k]["scale"])[0] for k, meta in header["layers"].items())
    assert any("group_index_bits" in meta for meta in header["layers"].values()) == act_order
    for k, L in back.layers.items():
        np.testing.assert_array_equal(L.q, im.layers[k].q)
        np.testing.assert_array_equal(L.group_index, np.asarray(qt.weight_qparams[k]["group_index"]))
    np.testing.assert_array_equal(back.logits(x), got)
    # the file's payload of scales, zero points and group indices is what size_report counts for them
    side = sum(a["nbytes"] for n, a in header["arrays"].items() if n.rsplit("/", 1)[1] in
               ("scale", "zero_point", "group_index"))
    counted = sum(v["bytes"] for v in size_report(qt)["layers"].values())
    codes = sum(a["nbytes"] for n, a in header["arrays"].items() if n.rsplit("/", 1)[1] in ("values", "index"))
    assert side + codes == counted


def test_cli_exports_a_grouped_gptq_ticket_and_eval_export_reads_it(capsys, tmp_path, tmp_path_factory):
    from lth.cli import COMMANDS, build_parser
    from test_export import stored_run
    run = stored_run.__wrapped__(tmp_path_factory)  # the one-level half-pruned ticket of test_export
    parser = build_parser()
    go = lambda *a: COMMANDS[a[0]].run(parser.parse_args(list(a)))  # noqa: E731
    out = tmp_path / "g.lthq"
    assert go("export", str(run), "--level", "0", "--bits", "4", "--out", str(out), "--method", "gptq",
              "--group-size", "8", "--act-order") == 0
    text = capsys.readouterr().out
    assert "smaller than fp32 dense" in text
    agree = float(text.rsplit("prediction agreement ", 1)[1].split("%")[0])
    assert agree >= 99.0
    assert go("eval-export", str(out)) == 0 and "gptq 4-bit" in capsys.readouterr().out
    _, header = read_export(out)
    assert header["info"]["granularity"] == "group8" and all(m["groups"] >= 2 for m in header["layers"].values())
    # a GPTQ setting with another method is a one-line error (exit 2 from lth's main)
    assert go("export", str(run), "--level", "0", "--bits", "4", "--out", str(out), "--group-size", "8") == 2
    err = capsys.readouterr().err.strip()
    assert "quant.group_size = 8 is a GPTQ setting" in err and "\n" not in err
