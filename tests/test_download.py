"""Downloads from a local HTTP server: files land verified, failures leave nothing, reruns skip."""

import functools
import gzip
import hashlib
import io
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from lth.config import DataConfig
from lth.data import CIFAR_FILES, IDX_FILES, DataError, load_dataset
from lth.download import SOURCES, FileSpec, download


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def idx_gz(a: np.ndarray) -> bytes:
    a = np.asarray(a, np.uint8)
    return gzip.compress(bytes([0, 0, 8, a.ndim]) + np.array(a.shape, ">u4").tobytes() + a.tobytes())


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; ``requests`` lists the paths asked for."""
    www = tmp_path / "www"
    www.mkdir()
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", www, requests
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def mnist_site(server):
    """Four tiny IDX .gz files on the server and matching FileSpecs."""
    url, www, requests = server
    rng = np.random.default_rng(0)
    blobs = {}
    for name, shape in zip(IDX_FILES, [(12, 4, 4), (12,), (5, 4, 4), (5,)]):
        hi = 256 if len(shape) == 3 else 10
        blobs[f"{name}.gz"] = idx_gz(rng.integers(0, hi, shape))
        (www / f"{name}.gz").write_bytes(blobs[f"{name}.gz"])
    specs = [FileSpec(url + n, sha(b), n) for n, b in blobs.items()]
    return specs, blobs, www, requests


def cifar_tar(members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"evil" * (info.size // 4)) if info.isreg() else None)
    return buf.getvalue()


def cifar_batches() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    out = {}
    for name in CIFAR_FILES:
        rec = rng.integers(0, 256, (2, 3073), dtype=np.uint8)
        rec[:, 0] %= 10
        out[name] = rec.tobytes()
    return out


def test_real_sources_are_complete():
    assert [s.filename for s in SOURCES["mnist"]] == [f"{n}.gz" for n in IDX_FILES]
    assert all(s.url.startswith("https://") and len(s.sha256) == 64 for v in SOURCES.values() for s in v)
    assert SOURCES["cifar10"][0].members == CIFAR_FILES


def test_mnist_download_lands_verified_loads_and_is_skipped_next_time(mnist_site, tmp_path, monkeypatch):
    specs, blobs, _, requests = mnist_site
    root = tmp_path / "data"
    assert download("mnist", root, sources={"mnist": specs}) == root / "mnist"
    assert sorted(p.name for p in root.iterdir()) == ["mnist"]  # no staging folder left
    assert {p.name: p.read_bytes() for p in (root / "mnist").iterdir()} == blobs
    assert len(requests) == 4

    requests.clear()
    download("mnist", root, sources={"mnist": specs})
    assert requests == []

    monkeypatch.setenv("LTH_DATA_DIR", str(root))
    load_dataset.cache_clear()
    d = load_dataset(DataConfig(name="mnist", val_size=2))
    load_dataset.cache_clear()
    assert (len(d.x_train), len(d.x_val), len(d.x_test), d.input_shape) == (10, 2, 5, (4, 4, 1))


def test_only_missing_or_damaged_files_are_fetched(mnist_site, tmp_path):
    specs, blobs, _, requests = mnist_site
    dest = tmp_path / "data" / "mnist"
    dest.mkdir(parents=True)
    (dest / specs[0].filename).write_bytes(blobs[specs[0].filename])  # good copy
    (dest / specs[1].filename).write_bytes(b"damaged")
    download("mnist", tmp_path / "data", sources={"mnist": specs})
    assert sorted(requests) == sorted("/" + s.filename for s in specs[1:])
    assert (dest / specs[1].filename).read_bytes() == blobs[specs[1].filename]


@pytest.mark.parametrize("root_exists", [False, True])
def test_checksum_mismatch_leaves_nothing(mnist_site, tmp_path, root_exists):
    specs, _, www, requests = mnist_site
    (www / specs[3].filename).write_bytes(b"corrupted in transit")
    root = tmp_path / "data"
    if root_exists:
        root.mkdir()
        (root / "other").write_text("keep me")
    with pytest.raises(DataError) as e:
        download("mnist", root, sources={"mnist": specs})
    msg = str(e.value)
    assert specs[3].url in msg and specs[3].sha256 in msg and sha(b"corrupted in transit") in msg
    assert len(requests) == 4  # the first three verified, yet they are not kept either
    if root_exists:
        assert [p.name for p in root.iterdir()] == ["other"]
    else:
        assert not root.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["www"]


def test_http_404_leaves_nothing(mnist_site, tmp_path):
    specs, _, _, _ = mnist_site
    missing = FileSpec(specs[0].url.rsplit("/", 1)[0] + "/nope.gz", "0" * 64, "nope.gz")
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(DataError, match="404") as e:
        download("mnist", root, sources={"mnist": [*specs[:2], missing]})
    assert missing.url in str(e.value) and "0" * 64 in str(e.value)
    assert list(root.iterdir()) == []


def test_unreachable_server_is_a_data_error(tmp_path):
    spec = FileSpec("http://127.0.0.1:9/x.gz", "1" * 64, "x.gz")  # discard port: refused
    with pytest.raises(DataError, match="could not download http://127.0.0.1:9/x.gz"):
        download("mnist", tmp_path / "data", sources={"mnist": [spec]}, timeout=5)
    assert not (tmp_path / "data").exists()


def test_unknown_name_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="downloadable: mnist, cifar10"):
        download("imagenet", tmp_path)


def test_cifar_archive_extracts_only_bin_files_safely(server, tmp_path, monkeypatch):
    url, www, requests = server
    batches = cifar_batches()
    evil_reg = tarfile.TarInfo("../data_batch_2.bin")
    evil_reg.size = 8
    evil_abs = tarfile.TarInfo("/tmp/test_batch.bin")
    evil_abs.size = 8
    link = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    members = {f"cifar-10-batches-bin/{n}": b for n, b in batches.items()}
    members["cifar-10-batches-bin/batches.meta.txt"] = b"airplane\n"
    members["cifar-10-batches-bin/readme.html"] = b"<html/>"
    tar = cifar_tar(members, [evil_reg, evil_abs, link])
    (www / "cifar.tar.gz").write_bytes(tar)
    spec = FileSpec(url + "cifar.tar.gz", sha(tar), "cifar-10-binary.tar.gz", members=CIFAR_FILES)
    root = tmp_path / "data"

    dest = download("cifar10", root, sources={"cifar10": [spec]})
    assert dest == root / "cifar10" and sorted(p.name for p in root.iterdir()) == ["cifar10"]
    names = sorted(p.name for p in dest.iterdir())
    assert names == sorted([*CIFAR_FILES, "cifar-10-binary.tar.gz.sha256sums"])  # no tarball kept
    assert all((dest / n).read_bytes() == b for n, b in batches.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "www"]  # nothing escaped

    monkeypatch.setenv("LTH_DATA_DIR", str(root))
    load_dataset.cache_clear()
    d = load_dataset(DataConfig(name="cifar10", val_size=1))
    load_dataset.cache_clear()
    assert (len(d.x_train), len(d.x_test), d.input_shape) == (9, 2, (32, 32, 3))

    requests.clear()
    download("cifar10", root, sources={"cifar10": [spec]})
    assert requests == []
    (dest / "test_batch.bin").write_bytes(b"damaged")
    download("cifar10", root, sources={"cifar10": [spec]})
    assert requests == ["/cifar.tar.gz"]
    assert (dest / "test_batch.bin").read_bytes() == batches["test_batch.bin"]


def test_cifar_archive_missing_a_batch_leaves_nothing(server, tmp_path):
    url, www, _ = server
    batches = cifar_batches()
    del batches["data_batch_4.bin"]
    tar = cifar_tar({f"cifar-10-batches-bin/{n}": b for n, b in batches.items()})
    (www / "cifar.tar.gz").write_bytes(tar)
    spec = FileSpec(url + "cifar.tar.gz", sha(tar), "cifar-10-binary.tar.gz", members=CIFAR_FILES)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="lacks data_batch_4.bin"):
        download("cifar10", root, sources={"cifar10": [spec]})
    assert not root.exists()
