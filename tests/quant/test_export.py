"""Size accounting (hand-computed bytes), bit packing, and the export file round trip."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.cli import COMMANDS, build_parser
from lth.quant import export_level
from lth.quant.export import (ExportError, decode_kernel, encode_kernel, encoded_sizes, eval_export, export_bytes,
                              pack_bits, payload_bytes, read_export, size_report, unpack_bits, write_export)
from lth.config import ExperimentConfig
from lth.data import load_dataset
from lth.quant import from_quantized
from lth.models import MLP, build_model
from lth.quant import QuantSpec, ptq, qrange
from lth.store import RunStore, StoreError, tree_bytes


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_round_trips_and_uses_exactly_n_bits_per_value(bits):
    v = np.random.default_rng(bits).integers(0, 2 ** bits, 37)
    buf = pack_bits(v, bits)
    assert buf.dtype == np.uint8 and buf.size == math.ceil(37 * bits / 8)
    np.testing.assert_array_equal(unpack_bits(buf, bits, 37), v)
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits([2 ** bits], bits)


def test_encoded_sizes_match_hand_computed_bytes():
    q = np.zeros((8, 8), np.int64)  # 64 entries, non-zeros at flat 0, 5 and 40, 4-bit sym codes
    q.flat[[0, 5, 40]] = [3, -7, 1]
    sizes = encoded_sizes(q, np.zeros(()), 4)
    # dense: 64 x 4 bits = 32 B; bitmask: 64 bits + 3 x 4 bits = 8 + 2 B;
    # relative: gaps 0, 4, 34; with r = 3 (escape 7): fields 0 | 4 | 7 7 7 7 6 = 7 x 3 bits = 3 B, + 2 B values
    assert sizes == {"dense": 32, "bitmask": 10, "relative": 5, "relative_bits": 3, "nnz": 3}
    for encoding, nbytes in (("dense", 32), ("bitmask", 10), ("relative", 5)):
        arrays, meta = encode_kernel(q, np.zeros(()), 4, "sym", encoding)
        assert sum(a.nbytes for a in arrays.values()) == nbytes
        np.testing.assert_array_equal(decode_kernel(arrays, meta, np.zeros(())), q)


@pytest.mark.parametrize("bits, scheme", [(8, "asym"), (3, "sym"), (1, "sym")])
def test_kernels_round_trip_through_every_encoding(bits, scheme):
    rng = np.random.default_rng(bits)
    zp = rng.integers(0, 2 ** bits, 5) if scheme == "asym" else np.zeros(5, np.int64)
    lo, hi = qrange(bits, scheme)
    q = rng.integers(lo, hi + 1, (40, 5))
    if bits == 1:
        q = np.where(q == 0, 1, q)
    q = np.where(rng.random((40, 5)) < 0.8, np.broadcast_to(zp, q.shape), q)  # 80% zeros (= zero point)
    q[:, 3] = zp[3]  # a fully pruned channel
    for encoding in ("dense", "bitmask", "relative"):
        if encoding == "dense" and bits == 1:
            with pytest.raises(ValueError, match="sparse encoding"):
                encode_kernel(q, zp, bits, scheme, encoding)
            continue
        arrays, meta = encode_kernel(q, zp, bits, scheme, encoding)
        assert sum(a.nbytes for a in arrays.values()) == encoded_sizes(q, zp, bits)[encoding]
        np.testing.assert_array_equal(decode_kernel(arrays, meta, zp), q)


def tiny_ticket():
    """LeNet-like 3 -> 4 -> 2 MLP with hand-picked weights (dense_0 has 2 non-zeros of 12)."""
    model = MLP((4,), 2)
    k0 = np.zeros((3, 4), np.float32)
    k0.flat[[0, 11]] = [1.0, -0.5]
    k1 = np.array([[1, 2], [3, 4], [5, 6], [7, -8]], np.float32) / 8
    params = {"dense_0": {"kernel": jnp.asarray(k0), "bias": jnp.array([0.1, 0.0, -0.2, 0.3])},
              "output": {"kernel": jnp.asarray(k1), "bias": jnp.array([0.05, -0.05])}}
    return model, params


def test_size_report_matches_hand_computed_bytes():
    model, params = tiny_ticket()
    qt = ptq(model, params, {}, QuantSpec(8, "sym", "tensor", "minmax"))  # weights only
    r = size_report(qt)
    # 26 parameters: fp32 104 B, fp16 52 B.
    # dense_0: relative index, r = 4: gaps 0 and 10 -> 2 x 4 bits = 1 B + 2 x 8-bit values = 2 B; scale 4 B
    # output: dense 8 x 8 bits = 8 B (no zeros); scale 4 B.  Biases: 6 x 4 B = 24 B.
    assert r["layers"]["dense_0"] == {"n": 12, "nnz": 2, "encoding": "relative", "bytes": 3 + 4}
    assert r["layers"]["output"] == {"n": 8, "nnz": 8, "encoding": "dense", "bytes": 8 + 4}
    assert (r["fp32_dense_bytes"], r["fp16_dense_bytes"], r["int8_dense_bytes"]) == (104, 52, 12 + 4 + 8 + 4 + 24)
    assert r["size_bytes"] == 7 + 12 + 24 == 43 and r["compression"] == pytest.approx(104 / 43)
    # with 8-bit asymmetric activations: a 4-byte scale and a 1-byte zero point per layer input
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    qa = ptq(model, params, {}, QuantSpec(8, "sym", "tensor", "minmax", act_bits=8), x)
    assert size_report(qa)["size_bytes"] == 43 + 2 * 5
    # asymmetric per-channel weights: 4-byte scale + 1-byte zero point per output channel
    qc = ptq(model, params, {}, QuantSpec(8, "asym", "channel", "minmax"))
    assert sum(v["bytes"] for v in size_report(qc)["layers"].values()) == (
        sum(v["bytes"] - 4 for v in r["layers"].values()) + (4 + 2) * 5)


@pytest.fixture(scope="module")
def int_model():
    model = MLP((16, 8), 3)
    rng = np.random.default_rng(0)
    params = {"dense_0": {"kernel": jnp.asarray(rng.normal(size=(6, 16)) * (rng.random((6, 16)) < 0.3), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=16) * 0.1, jnp.float32)},
              "dense_1": {"kernel": jnp.asarray(rng.normal(size=(16, 8)) * (rng.random((16, 8)) < 0.3), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=8) * 0.1, jnp.float32)},
              "output": {"kernel": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), "bias": jnp.zeros(3)}}
    x = rng.normal(size=(500, 6)).astype(np.float32)
    qt = ptq(model, params, {}, QuantSpec(3, "asym", "channel", "minmax", act_bits=8), x[:200])
    return qt, from_quantized(model, qt, (6,), 3), x


def test_export_round_trip_gives_identical_predictions(int_model, tmp_path):
    qt, im, x = int_model
    path = tmp_path / "ticket.lthq"
    n = write_export(path, im, {"note": "test"})
    assert path.stat().st_size == n and [p.name for p in tmp_path.iterdir()] == ["ticket.lthq"]  # no temp files
    back, header = read_export(path)
    np.testing.assert_array_equal(back.logits(x), im.logits(x))
    for name, layer in im.layers.items():
        np.testing.assert_array_equal(back.layers[name].q, layer.q)
    assert header["info"] == {"note": "test"} and header["program"] == im.program
    # the payload is exactly what the size accounting counts; the header is small
    assert payload_bytes(im) == size_report(qt)["size_bytes"] == header["payload_bytes"]
    assert n - header["payload_bytes"] < 4096


def test_damaged_export_files_fail_clearly(int_model, tmp_path):
    _, im, _ = int_model
    blob = export_bytes(im)
    (tmp_path / "flip.lthq").write_bytes(blob[:-3] + bytes([blob[-3] ^ 1]) + blob[-2:])
    with pytest.raises(ExportError, match="checksum"):
        read_export(tmp_path / "flip.lthq")
    (tmp_path / "short.lthq").write_bytes(blob[:-10])
    with pytest.raises(ExportError, match="truncated or corrupted"):
        read_export(tmp_path / "short.lthq")
    (tmp_path / "junk.lthq").write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(ExportError, match="not an lth export file"):
        read_export(tmp_path / "junk.lthq")
    with pytest.raises(ExportError, match="missing"):
        read_export(tmp_path / "nope.lthq")


def test_export_checksum_covers_the_header(int_model, tmp_path):
    _, im, _ = int_model
    blob = export_bytes(im)
    assert blob.count(b'"bits":3') >= 1
    edited = blob.replace(b'"bits":3', b'"bits":4', 1)  # same length: only the checksum can tell
    (tmp_path / "edited.lthq").write_bytes(edited)
    with pytest.raises(ExportError, match="edited.lthq: file does not match its checksum"):
        read_export(tmp_path / "edited.lthq")


def test_export_header_missing_a_key_is_an_export_error(int_model, tmp_path):
    import hashlib
    import struct
    _, im, _ = int_model
    blob = export_bytes(im)
    (hlen,) = struct.unpack("<I", blob[8:12])
    header = json.loads(blob[12:12 + hlen])
    del header["num_classes"]
    head = json.dumps(header).encode()
    body = blob[:8] + struct.pack("<I", len(head)) + head + blob[12 + hlen:-32]
    (tmp_path / "nokey.lthq").write_bytes(body + hashlib.sha256(body).digest())  # a valid checksum
    with pytest.raises(ExportError, match="nokey.lthq: the header has no 'num_classes' entry"):
        read_export(tmp_path / "nokey.lthq")


# ---------------------------------------------------------------------------- a stored run

TINY = {
    "name": "tinyx", "seeds": [0],
    "data": {"name": "mnist1d", "mnist1d_samples": 1000, "val_size": 100},
    "model": {"name": "mlp", "widths": [24, 16]},
    "train": {"batch_size": 50, "steps": 60},
    "log": {"wandb": "disabled", "progress": False},
}


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    """A one-level run folder in lth.lottery's layout: a half-pruned ticket with random weights."""
    cfg = ExperimentConfig.from_dict(TINY)
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.num_classes, data.input_shape)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *data.input_shape)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.3).astype(np.float32), shapes)
    mask = jax.tree.map(lambda p: np.abs(p) >= np.median(np.abs(p)) if p.ndim == 2 else np.ones(p.shape, bool), params)
    store = RunStore(tmp_path_factory.mktemp("xstore"), cfg.run_id)
    store.write_hparams({**cfg.to_dict(), "run_id": cfg.run_id, "lth_version": "test", "num_steps": 60})
    store.write_level(0, {"members.json": json.dumps([{"arm": "ticket", "seed": 0}]).encode(),
                          "masks.msgpack": tree_bytes(jax.tree.map(lambda a: a[None], mask)),
                          "final.msgpack": tree_bytes({"params": jax.tree.map(lambda p, m: (p * m)[None], params, mask),
                                                       "batch_stats": {}})})
    return store.path


def test_export_level_then_eval_export_reports_the_same_accuracy(stored_run, tmp_path):
    out = tmp_path / "l0_4bit.lthq"
    r = export_level(stored_run, 0, 4, out, scheme="asym", calibration="mse")
    assert r["agreement"] >= 0.999 and r["integer_accuracy"] == pytest.approx(r["fake_quant_accuracy"], abs=2e-3)
    e = eval_export(out)
    assert e["accuracy"] == r["integer_accuracy"] and e["n"] == 200
    assert e["size_bytes"] == r["size_bytes"] and e["file_bytes"] == out.stat().st_size
    assert e["bits"] == 4 and e["scheme"] == "asym" and e["calibration"] == "mse" and e["level"] == 0
    assert 1 < e["compression"] and e["compression"] == pytest.approx(r["compression"])


def test_cli_export_and_eval_export(stored_run, tmp_path, capsys):
    parser = build_parser()
    out = tmp_path / "l0_8bit.lthq"
    rc = _run(parser.parse_args(["export", str(stored_run), "--level", "0", "--bits", "8", "--out", str(out)]))
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file() and "smaller than fp32 dense" in text and "agreement" in text
    assert re.search(r"integer \d+\.\d\d%, fake-quant \d+\.\d\d%", text)  # accuracy in percent
    assert _run(parser.parse_args(["eval-export", str(out)])) == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text and re.search(r"accuracy \d+\.\d\d% on \d+ examples", text)  # percent
    with pytest.raises(StoreError, match="level 3 is not complete"):  # cli.main prints it, exit code 2
        _run(parser.parse_args(["export", str(stored_run), "--level", "3", "--bits", "8", "--out", str(out)]))
    assert _run(parser.parse_args(["export", str(stored_run), "--level", "0", "--bits", "8", "--out", str(out),
                                            "--act-bits", "1"])) == 2
    assert "act_bits" in capsys.readouterr().err


@pytest.mark.parametrize("bits, scheme", [(8, "sym"), (4, "asym")])
def test_nm_encoding_round_trips_and_matches_hand_computed_bytes(bits, scheme):
    from lth.prune.nm import keep_per_group
    rng = np.random.default_rng(bits)
    zp = rng.integers(0, 2 ** bits, 6) if scheme == "asym" else np.zeros(6, np.int64)
    lo, hi = qrange(bits, scheme)
    q = rng.integers(lo, hi + 1, (3, 3, 4, 6))  # fan-in 36 = 9 groups of 4
    keep = keep_per_group(rng.normal(size=q.shape), np.ones(q.shape, bool), 4, 2)
    keep.reshape(-1, 6)[:4, 1] = [False, True, False, False]  # a group with one survivor (zero-point pad)
    q = np.where(keep, q, np.broadcast_to(zp, q.shape))
    q = np.where(q == zp, np.where(keep, np.minimum(zp + 1, hi), q), q)  # survivors differ from the zero point
    # 9 groups x 2 kept x 6 outputs = 108 values: 108 b bits + 108 x 2-bit indices
    expect = math.ceil(108 * bits / 8) + 27
    arrays, meta = encode_kernel(q, zp, bits, scheme, "nm", nm=(2, 4))
    assert meta["encoding"] == "nm" and sum(a.nbytes for a in arrays.values()) == expect
    np.testing.assert_array_equal(decode_kernel(arrays, meta, zp), q)
    with pytest.raises(ValueError, match="not 1:4"):
        encode_kernel(q, zp, bits, scheme, "nm", nm=(1, 4))


def test_nm_ticket_size_report_and_export_use_the_nm_encoding(tmp_path):
    from lth.prune.nm import keep_per_group
    model = MLP((8,), 4)
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in (("dense_0", (16, 8)), ("output", (8, 4))):
        w = rng.normal(size=shape).astype(np.float32)
        params[name] = {"kernel": jnp.asarray(w * keep_per_group(w, np.ones(shape, bool), 4, 2)),
                        "bias": jnp.asarray(rng.normal(size=shape[1]) * 0.1, jnp.float32)}
    x = rng.normal(size=(300, 16)).astype(np.float32)
    qt = ptq(model, params, {}, QuantSpec(8, "sym", "channel", "minmax", act_bits=8), x[:100])
    plain, nm = size_report(qt), size_report(qt, nm=(2, 4))
    # 2:4 at 8 bits: 64 values + 64 x 2 bits = 80 B for dense_0 (bitmask: 128 bits + 64 B: the same)
    assert nm["layers"]["dense_0"]["encoding"] == "nm" and nm["layers"]["dense_0"]["bytes"] == 80 + 8 * 4
    assert nm["size_bytes"] == plain["size_bytes"]
    # a kept weight that quantizes to zero: bitmask saves its byte, nm pads its slot and is kept all the same
    params["dense_0"]["kernel"] = params["dense_0"]["kernel"].at[np.unravel_index(
        int(np.flatnonzero(np.asarray(params["dense_0"]["kernel"]))[0]), (16, 8))].set(1e-6)
    q0 = ptq(model, params, {}, QuantSpec(8, "sym", "channel", "minmax", act_bits=8), x[:100])
    assert size_report(q0)["layers"]["dense_0"]["encoding"] == "bitmask"
    assert size_report(q0, nm=(2, 4))["layers"]["dense_0"] == {"n": 128, "nnz": 63, "encoding": "nm", "bytes": 80 + 32}
    im = from_quantized(model, qt, (16,), 4)
    path = tmp_path / "nm.lthq"
    write_export(path, im, nm=(2, 4))
    back, header = read_export(path)
    assert {v["encoding"] for v in header["layers"].values()} == {"nm"}
    np.testing.assert_array_equal(back.predict(x), im.predict(x))


def _run(args) -> int:
    """A command of the ``lth`` table without main's error handling (so a test sees the exception)."""
    return COMMANDS[args.command].run(args)
