"""Download data sets with a sha256 check: nothing lands in the data root unless it verified.

Every file is streamed into a staging folder next to its destination while it is hashed; only
after all files of a data set verified (and archives were extracted) are they renamed into
``<dest_root>/<name>/``. Any failure removes the staging folder, so an interrupted or corrupt
download leaves nothing behind. Files already present with the right hash are not fetched again.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .data import CIFAR_FILES, IDX_FILES, TINYSTORIES_FILES, WIKITEXT2_FILES, DataError, data_dir

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class FileSpec:
    """One file to fetch. ``members``: for an archive (tar or zip), the base names to extract (nothing else
    is). ``size``: its length in bytes where pinned (a transfer of another length is refused early)."""

    url: str
    sha256: str
    filename: str
    members: tuple[str, ...] = ()
    size: int | None = None


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_MNIST_SHA256 = (
    "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaf2e8b5d5cd4d1d94",
)

SOURCES: dict[str, list[FileSpec]] = {
    "mnist": [FileSpec(f"{_MNIST_URL}{n}.gz", sha, f"{n}.gz") for n, sha in zip(IDX_FILES, _MNIST_SHA256)],
    "cifar10": [FileSpec("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                         "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                         "cifar-10-binary.tar.gz", members=CIFAR_FILES)],
    # TinyStories (Eldan & Li 2023), the validation file only (19 MB: plenty for a byte-level GPT on a
    # CPU; the 1.9 GB train file is not fetched), at a pinned revision of the authors' Hugging Face
    # repository; sha256 and size as published for that revision (Hugging Face LFS metadata, quoted alike
    # by several public projects that pin the file)
    "tinystories": [FileSpec("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/"
                             "f54c09fd23315a6f9c86f9dc80f725de7d8f9c64/TinyStories-valid.txt",
                             "94e431816c4cce81ff71e4408ff8d3bda9a42e8d2663986697c3954288cb38b4",
                             TINYSTORIES_FILES[0], size=19_447_282)],
    # WikiText-2 raw (Merity et al. 2017): the original archive (its first host, research.metamind.io on
    # S3, is gone), as mirrored at a pinned commit of llama.cpp's CI data set on Hugging Face
    "wikitext2": [FileSpec("https://huggingface.co/datasets/ggml-org/ci/resolve/"
                           "927b3642933080f1b0e811e2f916e14c292992f9/wikitext-2-raw-v1.zip",
                           "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
                           "wikitext-2-raw-v1.zip", members=WIKITEXT2_FILES, size=4_721_645)],
}


def download(name: str, dest_root: Path | None = None, *, sources: dict[str, list[FileSpec]] | None = None,
             timeout: float = 60) -> Path:
    """Fetch data set ``name`` into ``dest_root/name`` (default ``$LTH_DATA_DIR``) and return that folder.

    ``sources`` replaces :data:`SOURCES` (tests point it at a local server). Raises
    :class:`DataError` naming the url and hashes on a network error or checksum mismatch.
    """
    sources = SOURCES if sources is None else sources
    if name not in sources:
        raise DataError(f"no download for data set {name!r}; downloadable: {', '.join(sources)}")
    root = Path(dest_root).expanduser() if dest_root is not None else data_dir()
    dest = root / name
    todo = [spec for spec in sources[name] if not _is_present(dest, spec)]
    if not todo:
        return dest
    created = _make_dirs(root)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=root))
        try:
            out = staging / name
            out.mkdir()
            for spec in todo:
                if spec.members:
                    archive = staging / spec.filename
                    _fetch(spec, archive, timeout)
                    _extract(spec, archive, out)
                else:
                    _fetch(spec, out / spec.filename, timeout)
            _install(out, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass  # not empty: someone else wrote there
        raise
    return dest


# ---------------------------------------------------------------------------- helpers

def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _manifest(dest: Path, spec: FileSpec) -> Path:
    """Record of an extracted archive: its sha256 and those of the members taken from it."""
    return dest / f"{spec.filename}.sha256sums"


def _is_present(dest: Path, spec: FileSpec) -> bool:
    """Whether ``spec``'s file (or, for an archive, every member) is in ``dest`` and verifies."""
    try:
        if not spec.members:
            return sha256_file(dest / spec.filename) == spec.sha256
        lines = _manifest(dest, spec).read_text().splitlines()
        if not lines or lines[0] != f"# {spec.filename} {spec.sha256}":
            return False
        sums = dict(reversed(line.split("  ", 1)) for line in lines[1:])
        return all(m in sums and sha256_file(dest / m) == sums[m] for m in spec.members)
    except (OSError, ValueError):
        return False


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the folders it created, outermost first."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    path.mkdir(parents=True, exist_ok=True)
    return missing


def _fetch(spec: FileSpec, path: Path, timeout: float) -> None:
    """Stream ``spec.url`` into ``path`` while hashing; DataError on a network error or mismatch."""
    h, n = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(spec.url, timeout=timeout) as r, open(path, "wb") as f:
            while chunk := r.read(CHUNK_BYTES):
                h.update(chunk)
                f.write(chunk)
                n += len(chunk)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        else:
            reason = getattr(e, "reason", None) or e
        raise DataError(f"could not download {spec.url} (expected sha256 {spec.sha256}): {reason}; "
                        f"nothing was saved. Check the connection and retry, or put the file in "
                        f"place by hand") from None
    if spec.size is not None and n != spec.size:
        raise DataError(f"size mismatch for {spec.url}: expected {spec.size} bytes, got {n}; the file was "
                        f"discarded (a cut transfer or a changed upstream file)")
    if h.hexdigest() != spec.sha256:
        raise DataError(f"sha256 mismatch for {spec.url}: expected {spec.sha256}, got {h.hexdigest()}; "
                        f"the file was discarded (a damaged transfer or a changed upstream file)")


def _extract(spec: FileSpec, archive: Path, out: Path) -> None:
    """Copy ``spec.members`` (regular files, matched by base name) out of a tar or zip archive into ``out``.

    Members are written under their base name only, so a path in the archive can never escape
    ``out``; links, devices and names with ``..`` or an absolute path are ignored.
    """
    wanted, sums = set(spec.members), {}

    def take(name: str, regular: bool, open_member) -> None:
        parts = PurePosixPath(name).parts
        base = parts[-1] if parts else ""
        if base not in wanted or not regular or name.startswith("/") or ".." in parts:
            return
        if base in sums:
            raise DataError(f"{spec.url}: archive holds {base} twice; refusing to guess")
        src = open_member()
        if src is None:
            return
        h = hashlib.sha256()
        with src, open(out / base, "wb") as f:
            while chunk := src.read(CHUNK_BYTES):
                h.update(chunk)
                f.write(chunk)
        sums[base] = h.hexdigest()

    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():  # a zip entry is a regular file unless a folder or a symlink
                    link = (info.external_attr >> 16) & 0o170000 == 0o120000
                    take(info.filename, not info.is_dir() and not link, lambda info=info: z.open(info))
        else:
            with tarfile.open(archive, "r:*") as tar:
                for info in tar:
                    take(info.name, info.isreg(), lambda info=info: tar.extractfile(info))
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{spec.url}: cannot extract {spec.filename}: {e}") from None
    missing = [m for m in spec.members if m not in sums]
    if missing:
        raise DataError(f"{spec.url}: archive {spec.filename} lacks {', '.join(missing)}")
    lines = [f"# {spec.filename} {spec.sha256}"] + [f"{sums[m]}  {m}" for m in spec.members]
    _manifest(out, spec).write_text("\n".join(lines) + "\n")


def _install(out: Path, dest: Path) -> None:
    """Move the verified files in ``out`` into ``dest``: one rename when ``dest`` is new."""
    if not dest.exists():
        os.rename(out, dest)
        return
    for f in out.iterdir():
        os.replace(f, dest / f.name)
