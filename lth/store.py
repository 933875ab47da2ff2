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

A level counts as complete only when COMPLETE exists and every file still matches its checksum, so
a killed process or a corrupted file makes the level recompute instead of being silently used.
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


class StoreError(Exception):
    """A store folder or file that cannot be used; the message names the path."""


FAILPOINT_ENV = "LTH_FAILPOINT"


def failpoint(name: str) -> None:
    """Fault injection for the kill tests: SIGKILL this process when $LTH_FAILPOINT equals ``name``."""
    if os.environ.get(FAILPOINT_ENV) == name:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data[: len(data) // 2])
            failpoint(f"write:{path.parent.name}/{path.name}")  # dies with a half-written temp file
            f.write(data[len(data) // 2:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
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

    def is_finished(self, levels: int) -> bool:
        return all(self.is_complete(level) for level in range(levels + 1))

    def level_dir(self, level: int) -> Path:
        return self.path / f"level_{level:03d}"

    # --------------------------------------------------------------- run files
    def write_hparams(self, hparams: dict) -> None:
        path = self.path / "hparams.json"
        if path.exists():
            old = read_json(path)
            if old.get("run_id") != hparams.get("run_id"):
                raise StoreError(f"{path} belongs to run {old.get('run_id')}, not {hparams.get('run_id')}")
        atomic_write_json(path, hparams)

    def write_tree(self, name: str, tree: Any) -> None:
        atomic_write_bytes(self.path / name, tree_bytes(tree))

    def read_tree(self, name: str) -> Any:
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

    def completed_levels(self) -> list[int]:
        out = []
        level = 0
        while self.is_complete(level):
            out.append(level)
            level += 1
        return out
