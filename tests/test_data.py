"""Data sets: shapes, splits, normalization, the mnist1d cache, IDX/CIFAR readers and their errors."""

import gzip
import random

import numpy as np
import pytest

import lth.config
from lth import data as data_mod
from lth.config import DataConfig
from lth.data import DATASETS, DataError, load_dataset, read_cifar_batch, read_idx


@pytest.fixture(autouse=True)
def fresh_cache():
    load_dataset.cache_clear()
    yield
    load_dataset.cache_clear()


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """Empty data and cache roots."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    monkeypatch.setenv("LTH_DATA_DIR", str(data))
    monkeypatch.setenv("LTH_CACHE_DIR", str(cache))
    return data, cache


def idx_bytes(a: np.ndarray, dtype_code: int = 0x08) -> bytes:
    a = np.asarray(a, np.uint8)
    return bytes([0, 0, dtype_code, a.ndim]) + np.array(a.shape, ">u4").tobytes() + a.tobytes()


def tiny_idx_set(folder, n_train=20, n_test=6, gz=True, hw=(4, 5)):
    """Tiny IDX files; pixel [0, 0] of image i holds i so rows can be traced through the split."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
        x[:, 0, 0] = np.arange(n)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        arrays[prefix] = (x, y)
        for kind, a in (("images-idx3", x), ("labels-idx1", y)):
            name = folder / f"{prefix}-{kind}-ubyte"
            blob = idx_bytes(a)
            if gz:
                name.with_name(name.name + ".gz").write_bytes(gzip.compress(blob))
            else:
                name.write_bytes(blob)
    return arrays


def test_config_accepts_exactly_the_registered_data_sets():
    for name in DATASETS:
        assert lth.config.DataConfig(name=name).name == name
    with pytest.raises(lth.config.ConfigError, match="data.name = 'mnist2': unknown data set 'mnist2'; registered: "
                                                     "mnist1d, fashion_mnist, mnist, cifar10"):
        lth.config.DataConfig(name="mnist2")


# ---------------------------------------------------------------------------- mnist1d

def test_mnist1d_shapes_split_normalization_and_cache_file(roots, monkeypatch):
    _, cache = roots
    d = load_dataset(DataConfig(mnist1d_samples=1000, val_size=100))
    assert (d.x_train.shape, d.x_val.shape, d.x_test.shape) == ((700, 40), (100, 40), (200, 40))
    assert d.y_train.shape == (700,) and d.input_shape == (40,) and d.num_classes == 10
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert set(np.unique(d.y_train)) == set(range(10))
    assert abs(d.x_train.mean()) < 1e-5 and abs(d.x_train.std() - 1) < 1e-4
    assert len(list(cache.glob("mnist1d-1000-*.npz"))) == 1
    assert load_dataset(DataConfig(mnist1d_samples=1000, val_size=100)) is d  # in-process cache

    # val/test use the train split's statistics (scalar for flat inputs), not their own
    load_dataset.cache_clear()
    import mnist1d.data
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda *a, **k: pytest.fail("cache file ignored"))
    raw = load_dataset(DataConfig(mnist1d_samples=1000, val_size=100, normalize=False))
    mean, std = raw.x_train.mean(dtype=np.float64), raw.x_train.std(dtype=np.float64)
    np.testing.assert_allclose(d.x_test, (raw.x_test - mean) / std, atol=1e-5)
    np.testing.assert_allclose(d.x_val, (raw.x_val - mean) / std, atol=1e-5)
    np.testing.assert_array_equal(d.y_test, raw.y_test)


def test_mnist1d_default_val_size_and_corrupt_cache_regenerates(roots):
    _, cache = roots
    d = load_dataset(DataConfig(mnist1d_samples=1000))
    assert (len(d.x_train), len(d.x_val)) == (300, 500)
    (path,) = cache.glob("*.npz")
    path.write_bytes(b"not a zip file")
    load_dataset.cache_clear()
    np.random.seed(7)
    random.seed(7)
    expected = (np.random.rand(), random.random())
    np.random.seed(7)
    random.seed(7)
    again = load_dataset(DataConfig(mnist1d_samples=1000))
    assert (np.random.rand(), random.random()) == expected  # generation leaves global RNGs alone
    np.testing.assert_array_equal(again.x_train, d.x_train)
    with np.load(path) as f:  # the cache was rewritten
        assert f["x_train"].shape == (800, 40)
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temp files left


def test_split_is_deterministic_and_seeded(roots):
    a = load_dataset(DataConfig(mnist1d_samples=1000, split_seed=0, normalize=False))
    load_dataset.cache_clear()
    b = load_dataset(DataConfig(mnist1d_samples=1000, split_seed=0, normalize=False))
    c = load_dataset(DataConfig(mnist1d_samples=1000, split_seed=1, normalize=False))
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert not np.array_equal(a.x_val, c.x_val)
    np.testing.assert_array_equal(a.x_test, c.x_test)


def test_arrays_are_read_only(roots):
    d = load_dataset(DataConfig(mnist1d_samples=1000))
    with pytest.raises(ValueError):
        d.x_train[0, 0] = 1.0


# ---------------------------------------------------------------------------- IDX sets

def test_fashion_mnist_from_debian_package(roots):
    d = load_dataset(DataConfig(name="fashion_mnist"))
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (55000, 5000, 10000)
    assert d.input_shape == (28, 28, 1) and d.x_train.dtype == np.float32 and d.y_test.dtype == np.int32
    assert set(np.unique(d.y_test)) == set(range(10))
    assert np.abs(d.x_train.mean(axis=(0, 1, 2))).max() < 1e-4
    assert abs(d.x_train.std() - 1) < 1e-3


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_tiny_idx_files_load_exactly(roots, gz):
    data, _ = roots
    arrays = tiny_idx_set(data / "mnist", gz=gz)
    d = load_dataset(DataConfig(name="mnist", val_size=5, normalize=False))
    (x, y), (xt, yt) = arrays["train"], arrays["t10k"]
    assert d.input_shape == (4, 5, 1) and (len(d.x_train), len(d.x_val)) == (15, 5)
    np.testing.assert_array_equal(d.x_test[..., 0], xt / np.float32(255))
    np.testing.assert_array_equal(d.y_test, yt)
    ids_train = np.rint(d.x_train[:, 0, 0, 0] * 255).astype(int)
    ids_val = np.rint(d.x_val[:, 0, 0, 0] * 255).astype(int)
    assert sorted([*ids_train, *ids_val]) == list(range(20))  # a partition of train
    np.testing.assert_array_equal(d.x_val[..., 0], x[ids_val] / np.float32(255))
    np.testing.assert_array_equal(d.y_val, y[ids_val])
    np.testing.assert_array_equal(d.y_train, y[ids_train])


def test_lth_data_dir_takes_precedence_for_fashion_mnist(roots):
    data, _ = roots
    tiny_idx_set(data / "fashion_mnist", n_train=12)
    d = load_dataset(DataConfig(name="fashion_mnist", val_size=2))
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (10, 2, 6)
    assert np.abs(d.x_train.mean(axis=(0, 1, 2))).max() < 1e-5  # normalized per channel


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("damage, fragment", [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\0", "damaged"),
    (lambda b: b"\x01\x02" + b[2:], "bad magic"),
    (lambda b: b[:2] + b"\x0d" + b[3:], "0x0d is not supported"),
    (lambda b: b[:10], "truncated IDX header"),
])
def test_bad_idx_file_raises_naming_file(tmp_path, gz, damage, fragment):
    blob = damage(idx_bytes(np.zeros((3, 2, 2))))
    path = tmp_path / ("f.idx.gz" if gz else "f.idx")
    path.write_bytes(gzip.compress(blob) if gz else blob)
    with pytest.raises(DataError, match=fragment) as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_truncated_gzip_stream_raises_naming_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(200).reshape(2, 10, 10)))[:-12])
    with pytest.raises(DataError, match="truncated") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_damaged_file_in_data_dir_is_named_by_load_dataset(roots):
    data, _ = roots
    tiny_idx_set(data / "mnist", gz=False)
    bad = data / "mnist" / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-2])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: payload"):
        load_dataset(DataConfig(name="mnist"))


def test_image_and_label_counts_must_match(roots):
    data, _ = roots
    tiny_idx_set(data / "mnist", gz=False)
    (data / "mnist" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(19)))
    with pytest.raises(DataError, match="20 images but .* 19 labels"):
        load_dataset(DataConfig(name="mnist", val_size=1))


def test_labels_outside_0_9_are_rejected(roots):
    data, _ = roots
    tiny_idx_set(data / "mnist", gz=False)
    (data / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(6, 10)))
    with pytest.raises(DataError, match=r"label 10 is outside \[0, 9\]"):
        load_dataset(DataConfig(name="mnist", val_size=1))


def test_missing_mnist_names_every_path_and_the_fix(roots):
    data, _ = roots
    (data / "mnist").mkdir(parents=True)
    (data / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_dataset(DataConfig(name="mnist"))
    msg = str(e.value)
    assert str(data / "mnist") in msg and "lth data download mnist" in msg and "LTH_DATA_DIR" in msg
    assert "missing: train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte" in msg


def test_missing_fashion_mnist_names_both_folders(roots, monkeypatch, tmp_path):
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "no-such-package")
    with pytest.raises(DataError) as e:
        load_dataset(DataConfig(name="fashion_mnist"))
    msg = str(e.value)
    assert str(roots[0] / "fashion_mnist") in msg and str(tmp_path / "no-such-package") in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_val_size_too_large_is_an_error(roots):
    data, _ = roots
    tiny_idx_set(data / "mnist")
    with pytest.raises(DataError, match=r"val_size = 20 must be in \[0, 20\)"):
        load_dataset(DataConfig(name="mnist", val_size=20))
    assert len(load_dataset(DataConfig(name="mnist", val_size=0)).x_val) == 0


# ---------------------------------------------------------------------------- CIFAR-10

def cifar_records(n, seed=0):
    rng = np.random.default_rng(seed)
    rec = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
    rec[:, 0] = rng.integers(0, 10, n)
    return rec


def write_cifar(folder, n_per_batch=2, n_test=3):
    folder.mkdir(parents=True, exist_ok=True)
    recs = {}
    for i, name in enumerate(data_mod.CIFAR_FILES):
        recs[name] = cifar_records(n_test if name == "test_batch.bin" else n_per_batch, seed=i)
        (folder / name).write_bytes(recs[name].tobytes())
    return recs


def test_cifar_record_round_trips_to_nhwc(roots):
    data, _ = roots
    recs = write_cifar(data / "cifar10" / "cifar-10-batches-bin")  # the tarball's own subfolder
    d = load_dataset(DataConfig(name="cifar10", val_size=0, normalize=False))
    assert d.input_shape == (32, 32, 3) and len(d.x_train) == 10 and len(d.x_test) == 3
    test = recs["test_batch.bin"]
    n, h, w, c = np.indices((3, 32, 32, 3))
    expected = test[n, 1 + c * 1024 + h * 32 + w]  # stored channel-major, then row-major
    np.testing.assert_array_equal(np.rint(d.x_test * 255), expected)
    np.testing.assert_array_equal(d.y_test, test[:, 0])
    assert d.x_test[1, 5, 7, 2] == np.float32(test[1, 1 + 2 * 1024 + 5 * 32 + 7] / 255)
    np.testing.assert_array_equal(d.y_train[:2], recs["data_batch_1.bin"][:, 0])


def test_cifar_is_standardized_per_channel_with_the_train_splits_statistics(roots):
    """Each RGB channel gets its own mean and std, computed from the train split (after the val
    hold-out) and applied to val and test as well."""
    data, _ = roots
    folder = data / "cifar10"
    folder.mkdir(parents=True)
    for i, name in enumerate(data_mod.CIFAR_FILES):
        rec = cifar_records(8, seed=i)
        for c, (lo, hi) in enumerate(((0, 40), (100, 140), (50, 250))):  # channels of unlike ranges
            rec[:, 1 + c * 1024:1 + (c + 1) * 1024] = np.random.default_rng(i + 10 * c).integers(lo, hi, (8, 1024))
        (folder / name).write_bytes(rec.tobytes())
    raw = load_dataset(DataConfig(name="cifar10", val_size=4, normalize=False))
    d = load_dataset(DataConfig(name="cifar10", val_size=4))
    x64 = raw.x_train.astype(np.float64)
    mean, std = x64.mean((0, 1, 2)), x64.std((0, 1, 2))
    assert np.ptp(mean) > 0.3 and np.ptp(std) > 0.1  # really per channel: one scalar would not fit
    np.testing.assert_allclose(d.x_train.mean((0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(d.x_train.std((0, 1, 2)), 1, atol=1e-4)
    for split in ("x_val", "x_test"):
        np.testing.assert_allclose(getattr(d, split), (getattr(raw, split) - mean) / std, atol=1e-4)


def test_truncated_cifar_file_raises_naming_it(roots):
    data, _ = roots
    write_cifar(data / "cifar10")
    bad = data / "cifar10" / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DataError, match="not a positive multiple of the 3073-byte record") as e:
        load_dataset(DataConfig(name="cifar10", val_size=1))
    assert str(bad) in str(e.value)


def test_missing_cifar_says_how_to_get_it(roots):
    with pytest.raises(DataError, match="lth data download cifar10") as e:
        load_dataset(DataConfig(name="cifar10"))
    assert str(roots[0] / "cifar10" / "cifar-10-batches-bin") in str(e.value)


def test_read_cifar_batch_rejects_bad_labels(tmp_path):
    rec = cifar_records(2)
    rec[1, 0] = 11
    (tmp_path / "b.bin").write_bytes(rec.tobytes())
    with pytest.raises(DataError, match="label 11"):
        read_cifar_batch(tmp_path / "b.bin")


def test_data_fingerprint_is_recorded_and_other_data_under_the_same_run_id_stops_a_rerun(roots, tmp_path):
    import json
    from lth.lottery import run_lottery
    from lth.store import StoreError
    data, _ = roots
    tiny_idx_set(data / "mnist", n_train=40, n_test=10)
    cfg = lth.config.ExperimentConfig.from_dict({
        "data": {"name": "mnist", "val_size": 5}, "model": {"widths": [4]},
        "train": {"batch_size": 5, "steps": 2}, "prune": {"levels": 0},
        "log": {"wandb": "disabled", "progress": False}})
    store = run_lottery(cfg, tmp_path / "runs")
    fp = json.loads((store.path / "hparams.json").read_text())["data_fingerprint"]
    assert fp["train"] == 35 and fp["val"] == 5 and fp["test"] == 10 and len(fp["sha256"]) == 16
    arrays = tiny_idx_set(data / "mnist", n_train=40, n_test=10)  # the same files ...
    (data / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(  # ... but other test labels
        gzip.compress(idx_bytes((arrays["t10k"][1] + 1) % 10)))
    load_dataset.cache_clear()
    (store.path / "level_000" / "COMPLETE").unlink()
    with pytest.raises(StoreError, match="computed on other data") as e:
        run_lottery(cfg, tmp_path / "runs")
    stored, now = str(e.value).split("loaded now")
    assert f"sha256={fp['sha256']}" in stored and "sha256=" in now and fp["sha256"] not in now


def test_incomplete_fashion_mnist_folder_falling_back_is_said_on_stderr(roots, monkeypatch, tmp_path, capsys):
    data, _ = roots
    tiny_idx_set(tmp_path / "debian")
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    (data / "fashion_mnist").mkdir(parents=True)
    (data / "fashion_mnist" / "train-images-idx3-ubyte").write_bytes(b"")
    load_dataset(DataConfig(name="fashion_mnist", val_size=2))
    err = capsys.readouterr().err
    assert f"{data / 'fashion_mnist'}" in err and "is incomplete; using the files in" in err


def test_an_empty_test_split_is_an_error(roots):
    data, _ = roots
    tiny_idx_set(data / "mnist", n_test=0)
    with pytest.raises(DataError, match="mnist: the test split is empty"):
        load_dataset(DataConfig(name="mnist", val_size=5))
