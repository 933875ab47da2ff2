"""`lth data download tinystories|wikitext2`: pinned sha256 and size, zip extraction, nothing half-written,
and the named text data sets that read the downloaded files (WikiText-2 with its own split)."""

import hashlib
import io
import re
import zipfile

import numpy as np
import pytest

from lth.config import DataConfig
from lth.data import TINYSTORIES_FILES, WIKITEXT2_FILES, DataError, load_dataset
from lth.download import SOURCES, FileSpec, download

WIKI = {"wiki.train.raw": " = Valkyria = \n" * 300, "wiki.valid.raw": " = Tower = \n" * 40,
        "wiki.test.raw": " = Robert Boulter = \n" * 30}


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def wiki_zip(evil: bool = True) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in WIKI.items():
            z.writestr(f"wikitext-2-raw/{name}", text.encode())
        if evil:  # a path escaping the folder and a symlink named like a member: never extracted
            z.writestr("../wiki.test.raw", b"evil")
            link = zipfile.ZipInfo("other/wiki.valid.raw")
            link.external_attr = (0o120777 << 16)
            z.writestr(link, b"/etc/passwd")
    return buf.getvalue()


def spec_for(path, blob: bytes, members=(), size=None, digest=None) -> FileSpec:
    return FileSpec(path.as_uri(), digest or sha(blob), path.name, tuple(members), size)


def test_real_text_sources_are_pinned():
    for name, members in (("tinystories", ()), ("wikitext2", WIKITEXT2_FILES)):
        (spec,) = SOURCES[name]
        assert spec.url.startswith("https://huggingface.co/datasets/")
        assert re.search(r"/resolve/[0-9a-f]{40}/", spec.url)  # a pinned revision, not a moving branch
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256) and spec.size > 1_000_000
        assert spec.members == members
    assert SOURCES["tinystories"][0].filename == TINYSTORIES_FILES[0]


def test_wikitext2_zip_lands_verified_and_loads_with_its_own_split(tmp_path, monkeypatch):
    blob = wiki_zip()
    archive = tmp_path / "wikitext-2-raw-v1.zip"
    archive.write_bytes(blob)
    root = tmp_path / "data"
    spec = spec_for(archive, blob, WIKITEXT2_FILES, size=len(blob))
    assert download("wikitext2", root, sources={"wikitext2": [spec]}) == root / "wikitext2"
    got = {p.name: p.read_bytes() for p in (root / "wikitext2").iterdir() if p.suffix == ".raw"}
    assert got == {k: v.encode() for k, v in WIKI.items()}  # not the evil entries
    assert sorted(p.name for p in root.iterdir()) == ["wikitext2"]  # no staging folder left
    monkeypatch.setenv("LTH_DATA_DIR", str(root))
    load_dataset.cache_clear()
    d = load_dataset(DataConfig(name="wikitext2", context=8))
    assert bytes(d.train_tokens) == WIKI["wiki.train.raw"].encode()
    val = WIKI["wiki.valid.raw"].encode()
    assert bytes(d.x_val[0].astype(np.uint8)) == val[:8] and d.y_val.size <= len(val)
    test = WIKI["wiki.test.raw"].encode()
    assert bytes(d.x_test[0].astype(np.uint8)) == test[:8]
    assert d.x_test.size == (len(test) - 1) // 8 * 8
    load_dataset.cache_clear()


@pytest.mark.parametrize("bad", ["sha256", "size"])
def test_a_wrong_checksum_or_size_is_a_clear_error_and_leaves_nothing(tmp_path, bad):
    blob = wiki_zip()
    archive = tmp_path / "wikitext-2-raw-v1.zip"
    archive.write_bytes(blob)
    root = tmp_path / "data"
    spec = (spec_for(archive, blob, WIKITEXT2_FILES, digest="0" * 64) if bad == "sha256"
            else spec_for(archive, blob, WIKITEXT2_FILES, size=len(blob) + 1))
    with pytest.raises(DataError, match=f"{bad} mismatch for file://.*discarded") as e:
        download("wikitext2", root, sources={"wikitext2": [spec]})
    assert "\n" not in str(e.value)
    assert not root.exists()  # no half-written file, no staging folder, not even the root it made


def test_tinystories_lands_and_loads_by_name(tmp_path, monkeypatch):
    text = ("Once upon a time, Lily found a red ball. She was happy.\n" * 80).encode()
    src = tmp_path / TINYSTORIES_FILES[0]
    src.write_bytes(text)
    root = tmp_path / "data"
    monkeypatch.setenv("LTH_DATA_DIR", str(root))
    load_dataset.cache_clear()
    with pytest.raises(DataError, match="lth data download tinystories"):
        load_dataset(DataConfig(name="tinystories", context=16))
    download("tinystories", root, sources={"tinystories": [spec_for(src, text, size=len(text))]})
    load_dataset.cache_clear()
    d = load_dataset(DataConfig(name="tinystories", context=16))
    assert bytes(d.train_tokens) == text[:int(0.8 * len(text))]  # split by position, 80/10/10
    assert d.num_classes == 256
    load_dataset.cache_clear()
