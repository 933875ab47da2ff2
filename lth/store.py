"""The store: one folder per run id; every file written atomically; levels marked complete last.

Layout of ``ROOT/<run_id>/``::

    hparams.json                 the full experiment config (+ run_id, lth version)
    init.msgpack                 initial weights, one entry per seed (flax msgpack)
    rewind.msgpack               rewind-point weights (step k of the dense run), when k > 0
    level_000/members.json       arm and seed of each population member
    level_000/masks.msgpack      masks [K, ...]
    level_000/final.msgpack      final weights [K, ...]
    level_000/metrics.parquet    tidy metrics rows
    level_000/sparsity.parquet   per-layer counts, non-zeros and density of each member
    level_000/COMPLETE           written last: sha256 of every file of the level
    MANIFEST.json                sha256 of every run-level file written with write_tree/write_file

A level counts as complete only when COMPLETE exists and every file still matches its checksum, so
a killed process or a corrupted file makes the level recompute instead of being silently used.
Run-level files (``init.msgpack``, ``rewind.msgpack``, ...) are verified against ``MANIFEST.json``
on every read: its entry is written before the file, so a file that exists always has one (stores
written before the manifest existed have none and are read unverified). ``hparams.json`` is checked
against the run id it hashes to (:func:`check_hparams`) and, when both record one, against the
fingerprint of the data actually loaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flax import serialization

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"


class StoreError(Exception):
    """A store folder or file that cannot be used; the message names the path."""


FAILPOINT_ENV = "LTH_FAILPOINT"


def failpoint(name: str) -> None:
    """Fault injection for the kill tests: SIGKILL this process when $LTH_FAILPOINT equals ``name``."""
    if os.environ.get(FAILPOINT_ENV) == name:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _file_mode() -> int:
    """Mode of a new file under the process umask (``mkstemp`` alone creates 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``.

    The file gets the usual mode under the umask (a group-shared store stays group-readable). An
    OSError (a full disk, a read-only folder) becomes a StoreError naming ``path``; the old file,
    if any, is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise StoreError(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data[: len(data) // 2])
            failpoint(f"write:{path.parent.name}/{path.name}")  # dies with a half-written temp file
            f.write(data[len(data) // 2:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise StoreError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def tree_bytes(tree: Any) -> bytes:
    """Serialize a pytree of arrays with flax msgpack (no pickle)."""
    state = serialization.to_state_dict(tree)
    import jax
    return serialization.msgpack_serialize(jax.tree.map(np.asarray, state))


def load_tree(path: str | Path) -> Any:
    """Nested dict of numpy arrays from a msgpack file; StoreError naming the file if unreadable."""
    path = Path(path)
    try:
        return serialization.msgpack_restore(path.read_bytes())
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except Exception as e:  # msgpack raises many types on corrupt input
        raise StoreError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from None


def read_hparams(path: str | Path) -> dict:
    """A run's ``hparams.json`` as a dict; StoreError naming the file if it is not a JSON object."""
    h = read_json(path)
    if not isinstance(h, dict):
        raise StoreError(f"{path}: not a JSON object (got {type(h).__name__}); the file is damaged")
    return h


def check_hparams(path: str | Path, hparams: dict, run_id: str | None = None) -> None:
    """StoreError naming ``path`` unless the settings in ``hparams`` hash to ``run_id`` (default: the
    name of the folder holding ``path``), i.e. the file was not edited after its results were made."""
    from .config import ConfigError, stored_run_id  # late: config is not needed to read a store

    path = Path(path)
    run_id = run_id or path.parent.name
    try:
        got = stored_run_id(hparams, str(path))
    except ConfigError as e:
        raise StoreError(f"{path}: settings not readable by this lth ({e})") from None
    if got != run_id:
        raise StoreError(f"{path}: its settings hash to run id {got}, not {run_id} (the file was edited "
                         "after its results were computed); restore it or delete the run folder")


def read_parquet(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    try:
        return pd.read_parquet(path)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except Exception as e:
        raise StoreError(f"{path}: not a readable Parquet table ({type(e).__name__}: {e})") from None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def marked_file_problem(path: str | Path, marker: str | Path) -> str | None:
    """None when ``marker`` (JSON ``{"sha256": ...}``, written after ``path``) exists and ``path``
    matches its checksum; else why not (missing, unreadable marker, damaged file)."""
    path, marker = Path(path), Path(marker)
    if not marker.is_file():
        return f"{marker} is missing"
    try:
        expected = read_json(marker)["sha256"]
    except (StoreError, KeyError, TypeError):
        return f"{marker} is unreadable"
    if not path.is_file():
        return f"{path} is missing"
    if sha256(path) != expected:
        return f"{path} does not match its checksum"
    return None


def prepare_root(root: str | Path) -> Path:
    """Create the store root, or fail clearly when it is a file or not writable."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise StoreError(f"output folder {root} exists and is a file; choose a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe.", delete=True)
        probe.close()
    except OSError as e:
        raise StoreError(f"output folder {root} is not writable ({e.strerror})") from None
    return root


def _fp(fp: Any) -> str:
    if isinstance(fp, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(fp.items()))
    return str(fp)


def check_writable(folder: str | Path) -> Path:
    """StoreError naming ``folder`` unless a file can be created in it (checked before long work)."""
    folder = Path(folder)
    try:
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe.", delete=True)
        probe.close()
    except OSError as e:
        raise StoreError(f"{folder} is not writable ({e.strerror or e}); results could not be saved") from None
    return folder


class RunBusyError(StoreError):
    """Another process holds the run's lock (it is computing the run right now)."""


class RunStore:
    """Files of one run: ``root/<run_id>``."""

    def __init__(self, root: str | Path, run_id: str):
        self.root = Path(root)
        self.run_id = run_id
        self.path = self.root / run_id

    @contextlib.contextmanager
    def lock(self):
        """Exclusive claim on the run for this process (``flock``: released when the process dies).

        Two sweep processes on one store never compute the same run at once; RunBusyError if taken.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise RunBusyError(f"run {self.run_id} in {self.root} is being computed by {owner}") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
            for stale in self.path.rglob(".*.tmp"):  # left by a killed writer; nobody else writes now
                stale.unlink(missing_ok=True)
            yield self
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def busy_owner(self) -> str | None:
        """Who holds the run's lock right now ('pid N on HOST'), or None when nobody does."""
        try:
            fd = os.open(self.path / ".lock", os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def is_finished(self, levels: int) -> bool:
        return all(self.is_complete(level) for level in range(levels + 1))

    def level_dir(self, level: int) -> Path:
        return self.path / f"level_{level:03d}"

    # --------------------------------------------------------------- run files
    def write_hparams(self, hparams: dict) -> None:
        """Write ``hparams.json``; on a rerun first check the stored one: it must hash to this run id
        (not edited) and, when both record one, hold the same ``data_fingerprint``."""
        path = self.path / "hparams.json"
        if path.exists():
            old = read_hparams(path)
            if old.get("run_id") != hparams.get("run_id"):
                raise StoreError(f"{path} belongs to run {old.get('run_id')}, not {hparams.get('run_id')}")
            check_hparams(path, old, self.run_id)
            a, b = old.get("data_fingerprint"), hparams.get("data_fingerprint")
            if a is not None and b is not None and a != b:
                raise StoreError(f"{path}: run {self.run_id} was computed on other data: stored data "
                                 f"fingerprint {_fp(a)}, loaded now {_fp(b)} (check $LTH_DATA_DIR)")
        atomic_write_json(path, hparams)

    # Run-level files other than hparams.json go through write_file/read_file (write_tree/read_tree
    # for weights), which keep their sha256 in MANIFEST.json and verify it on every read.
    def manifest(self) -> dict[str, str] | None:
        """name -> sha256 of the run-level files; None for a store written before manifests."""
        path = self.path / MANIFEST
        if not path.exists():
            return None
        m = read_json(path)
        if not isinstance(m, dict) or not isinstance(m.get("sha256"), dict):
            raise StoreError(f"{path}: not a manifest (expected {{\"sha256\": {{file: sha256}}}})")
        return m["sha256"]

    def write_file(self, name: str, data: bytes) -> None:
        """Write a run-level file atomically, its checksum recorded first in MANIFEST.json.

        The first manifest of a store written before manifests adopts the weights files already there
        (read unverified until now), so they stay usable instead of counting as unrecorded."""
        old = self.manifest()
        sums = dict(old) if old is not None else {f.name: sha256(f) for f in sorted(self.path.glob("*.msgpack"))}
        sums[name] = hashlib.sha256(data).hexdigest()
        atomic_write_json(self.path / MANIFEST, {"sha256": sums})
        atomic_write_bytes(self.path / name, data)

    def file_problem(self, name: str) -> str | None:
        """None when the run-level file exists and matches its manifest entry; else why it does not."""
        path = self.path / name
        if not path.is_file():
            return f"{path} is missing"
        sums = self.manifest()
        if sums is None:  # an old store: nothing to verify against
            return None
        if name not in sums:
            return f"{path} has no checksum in {MANIFEST}"
        if sha256(path) != sums[name]:
            return f"{path} does not match its checksum (truncated or corrupted)"
        return None

    def read_file(self, name: str) -> bytes:
        """The verified bytes of a run-level file; StoreError naming it when missing or damaged."""
        problem = self.file_problem(name)
        if problem is not None:
            raise StoreError(problem)
        return (self.path / name).read_bytes()

    def write_tree(self, name: str, tree: Any) -> None:
        self.write_file(name, tree_bytes(tree))

    def read_tree(self, name: str) -> Any:
        """A verified run-level weights file (see :meth:`read_file`)."""
        self.read_file(name)
        return load_tree(self.path / name)

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    # --------------------------------------------------------------- levels
    def write_level(self, level: int, files: dict[str, bytes]) -> None:
        """Write a level's files atomically, then COMPLETE with their checksums (last)."""
        d = self.level_dir(level)
        d.mkdir(parents=True, exist_ok=True)
        (d / COMPLETE).unlink(missing_ok=True)
        sums = {}
        for name, data in files.items():
            atomic_write_bytes(d / name, data)
            sums[name] = hashlib.sha256(data).hexdigest()
            failpoint(f"after:{d.name}/{name}")  # dies between the files of a level
        atomic_write_json(d / COMPLETE, {"sha256": sums})

    def level_problem(self, level: int) -> str | None:
        """None when the level is complete and intact; else why it is not."""
        d = self.level_dir(level)
        if not (d / COMPLETE).is_file():
            return f"{d} has no {COMPLETE} marker"
        try:
            sums = read_json(d / COMPLETE)["sha256"]
        except (StoreError, KeyError, TypeError):
            return f"{d / COMPLETE} is unreadable"
        for name, expected in sums.items():
            f = d / name
            if not f.is_file():
                return f"{f} is missing"
            if sha256(f) != expected:
                return f"{f} does not match its checksum (truncated or corrupted)"
        return None

    def is_complete(self, level: int) -> bool:
        return self.level_problem(level) is None

