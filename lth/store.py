"""The store: one folder per run id; every file written atomically; levels marked complete last.

Layout of ``ROOT/<run_id>/``::

    hparams.json                 the full experiment config (+ run_id, lth version)
    init.msgpack                 initial weights, one entry per seed (flax msgpack; ``seeds`` says whose)
    rewind.msgpack               rewind-point weights (step k of the dense run), when k > 0
    level_000/members.json       arm and seed of each population member (small_dense.json: of the
                                 small-dense baselines in small_dense_final.msgpack)
    level_000/masks.msgpack      masks [K, ...]
    level_000/final.msgpack      final weights [K, ...]
    level_000/metrics.parquet    tidy metrics rows
    level_000/sparsity.parquet   per-layer counts, non-zeros and density of each member
    level_000/COMPLETE           written last: sha256 of every file of the level
    MANIFEST.json                sha256 of every run-level file written with write_tree/write_file

A level that grows (a rerun with more seeds or arms) is rebuilt in ``level_NNN.next/`` and swapped in
(:meth:`RunStore.write_level`); opening the store for writing repairs a swap left half done.
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
import re
import shutil
import sys
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


def plain_name(name: Any, where: str | Path) -> str:
    """``name`` when it is a file name inside its folder (a non-empty string without a path separator,
    not ``.`` or ``..``); StoreError naming ``where`` (the file that lists it) otherwise. Names read from
    store files go through here, so a crafted COMPLETE or MANIFEST.json cannot point outside the store."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name):
        raise StoreError(f"{where}: entry {name!r} is not a file name in its folder (expected a plain name "
                         "such as 'masks.msgpack'); the file is damaged or was edited")
    return name


_HEX64 = re.compile(r"[0-9a-f]{64}")


def read_sums(path: str | Path) -> dict[str, str]:
    """The ``{"sha256": {name: hex digest}}`` of a checksum file (a level's COMPLETE, MANIFEST.json),
    every name a plain file name (:func:`plain_name`) and every digest 64 hex digits; StoreError naming
    the file otherwise."""
    path = Path(path)
    obj = read_json(path)
    sums = obj.get("sha256") if isinstance(obj, dict) else None
    if not isinstance(sums, dict):
        raise StoreError(f"{path}: not a checksum file (expected {{\"sha256\": {{file: sha256}}}})")
    for name, digest in sums.items():
        plain_name(name, path)
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise StoreError(f"{path}: the checksum of {name!r} is {digest!r}, not 64 hex digits; the file is "
                             "damaged or was edited")
    return sums


def read_members_file(path: str | Path) -> list[dict]:
    """A level's ``members.json`` (or ``small_dense.json``): a list of ``{"arm": str, "seed": int}`` with
    an optional ``"copy": int >= 0``, checked entry by entry; StoreError naming the file otherwise."""
    path = Path(path)
    entries = read_json(path)
    if not isinstance(entries, list):
        raise StoreError(f"{path}: expected a list of members, got {type(entries).__name__}")
    out = []
    for k, e in enumerate(entries):
        ok = (isinstance(e, dict) and isinstance(e.get("arm"), str) and e["arm"] and _is_int(e.get("seed"))
              and (_is_int(e.get("copy", 0)) and e.get("copy", 0) >= 0) and not set(e) - {"arm", "seed", "copy"})
        if not ok:
            raise StoreError(f"{path}: member {k} is {e!r}; expected {{\"arm\": name, \"seed\": integer}} with an "
                             "optional \"copy\": integer >= 0 (the file is damaged or was edited)")
        out.append({"arm": e["arm"], "seed": int(e["seed"]), **({"copy": int(e["copy"])} if e.get("copy") else {})})
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_hparams(path: str | Path) -> dict:
    """A run's ``hparams.json`` as a dict; StoreError naming the file if it is not a JSON object."""
    h = read_json(path)
    if not isinstance(h, dict):
        raise StoreError(f"{path}: not a JSON object (got {type(h).__name__}); the file is damaged")
    return h


def check_hparams(path: str | Path, hparams: dict, run_id: str | None = None) -> None:
    """StoreError naming ``path`` unless the settings in ``hparams`` hash to ``run_id`` (default: the
    name of the folder holding ``path``), i.e. the file was not edited after its results were made.
    Either id scheme counts: the current one or the legacy one of stores written before runs could
    grow (:attr:`lth.config.ExperimentConfig.legacy_run_id`)."""
    from .config import ConfigError, stored_run_id  # late: config is not needed to read a store

    path = Path(path)
    run_id = run_id or path.parent.name
    try:
        got = stored_run_id(hparams, str(path))
        legacy = stored_run_id(hparams, str(path), legacy=True)
    except ConfigError as e:
        raise StoreError(f"{path}: settings not readable by this lth ({e})") from None
    if run_id not in (got, legacy):  # a store written before runs could grow is named by its legacy id
        raise StoreError(f"{path}: its settings hash to run id {got}, not {run_id} (the file was edited "
                         "after its results were computed); restore it or delete the run folder")


SEEDS_KEY = "seeds"  # in a run-level weights file stacked over seeds: which seed each entry is


def stacked_seeds(tree: dict, fallback=None, what: str = "a weights file") -> tuple[dict, list[int]]:
    """(the weights without the seeds record, the seed of each stacked entry) of a run-level weights
    file (``init.msgpack``, ``rewind.msgpack``). Files written before runs could grow have no record:
    their entries are the first K of ``fallback`` (the run's ``hparams.json`` seeds, which keep the
    stored seeds first). StoreError naming ``what`` when the record is not one distinct integer per
    stacked entry."""
    if not isinstance(tree, dict):
        raise StoreError(f"{what}: not a weights tree")
    tree = dict(tree)
    seeds = tree.pop(SEEDS_KEY, None)
    leaves = [x for x in _leaves(tree.get("params", {}))]
    k = int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 0
    if seeds is not None:
        rec = np.asarray(seeds)
        if rec.dtype.kind not in "iu" or rec.ndim != 1 or len(rec) != k or len(set(rec.tolist())) != k:
            raise StoreError(f"{what}: its seeds record {rec.tolist()!r} is not {k} distinct integers, one per "
                             "stacked entry (the file is damaged or was edited)")
        return tree, [int(x) for x in rec]
    fallback = [int(x) for x in (fallback or [])]
    if len(fallback) < k:
        raise StoreError(f"{what} stacks {k} seeds but records none, and hparams.json lists only "
                         f"{len(fallback)}")
    return tree, fallback[:k]


def with_seeds(tree: dict, seeds) -> dict:
    """``tree`` with its seeds record (see :func:`stacked_seeds`)."""
    return {**tree, SEEDS_KEY: np.asarray([int(s) for s in seeds], np.int64)}


def take_seeds(tree: Any, held: list[int], seeds, what: str = "a weights file") -> Any:
    """The entries of a stacked tree for ``seeds`` (in that order), from one holding ``held``, looked
    up by value; StoreError naming ``what`` when it lacks one of them."""
    held = [int(s) for s in held]
    lack = [int(s) for s in seeds if int(s) not in held]
    if lack:
        raise StoreError(f"{what} holds seeds {held}, not {lack}")
    idx = np.asarray([held.index(int(s)) for s in seeds], int)
    return _map_leaves(lambda a: np.asarray(a)[idx], tree)


def concat_stacked(a: Any, b: Any) -> Any:
    """Two stacked trees of one structure, ``a``'s entries first (bit for bit)."""
    if isinstance(a, dict):
        return {k: concat_stacked(a[k], b[k]) for k in a}
    return np.concatenate([np.asarray(a), np.asarray(b)])


def _leaves(t):
    if isinstance(t, dict):
        for v in t.values():
            yield from _leaves(v)
    else:
        yield t


def _map_leaves(fn, t):
    return {k: _map_leaves(fn, v) for k, v in t.items()} if isinstance(t, dict) else fn(t)


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
    if not isinstance(expected, str):
        return f"{marker} is unreadable (its sha256 is not a string)"
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


def check_fingerprint(path: str | Path, hparams: dict, loaded: Any) -> None:
    """StoreError naming ``path`` (a run's ``hparams.json``) when it records a ``data_fingerprint`` and
    the data loaded now (fingerprint ``loaded``) is other data: results computed on it do not belong
    in the run. Every command that computes from a stored run checks this (a rerun, each later stage)."""
    stored = hparams.get("data_fingerprint")
    if stored is not None and loaded is not None and stored != loaded:
        run_id = hparams.get("run_id", Path(path).parent.name)
        raise StoreError(f"{path}: run {run_id} was computed on other data: stored data fingerprint "
                         f"{_fp(stored)}, loaded now {_fp(loaded)} (check $LTH_DATA_DIR and $LTH_CACHE_DIR)")


def check_writable(folder: str | Path) -> Path:
    """StoreError naming ``folder`` unless a file can be created in it (checked before long work)."""
    folder = Path(folder)
    try:
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe.", delete=True)
        probe.close()
    except OSError as e:
        raise StoreError(f"{folder} is not writable ({e.strerror or e}); results could not be saved") from None
    return folder


NEXT, PREV = ".next", ".prev"  # a level being replaced: the new one built beside it, the old one moved aside


def _folder_problem(d: Path) -> str | None:
    """None when the level folder ``d`` has its COMPLETE marker and every file matches it."""
    if not (d / COMPLETE).is_file():
        return f"{d} has no {COMPLETE} marker"
    try:
        sums = read_sums(d / COMPLETE)
    except StoreError as e:
        return str(e)
    for name, expected in sums.items():
        f = d / name
        if not f.is_file():
            return f"{f} is missing"
        if sha256(f) != expected:
            return f"{f} does not match its checksum (truncated or corrupted)"
    return None


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
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o666)  # under the umask: group-shared stores
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
            for done in self.repair():  # a level swap a killed writer left half done
                print(f"lth: run {self.run_id}: {done}", file=sys.stderr)
            yield self
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def finish_swaps(self) -> None:
        """Finish or roll back (:meth:`repair`, under the run's lock, saying so on stderr) the level
        swaps a killed grow left half done (a ``level_NNN.next`` or ``.prev`` folder). Takes no lock
        when there is nothing to repair; leaves the folders to their writer when the run is busy, or
        as they are when its lock cannot be created (a read-only store). Commands that find a run
        finished, and the readers of a stored run (:class:`lth.stored.StoredRun`), call it first, so
        no level is skipped, and no ``.prev`` left behind, because of a kill in the middle of a swap."""
        if not self.path.is_dir() or not any(self.path.glob(f"level_[0-9][0-9][0-9]{NEXT}")) and not any(
                self.path.glob(f"level_[0-9][0-9][0-9]{PREV}")):
            return
        with contextlib.suppress(RunBusyError, OSError):
            with self.lock():
                pass  # lock() repairs

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
            check_fingerprint(path, old, hparams.get("data_fingerprint"))
        atomic_write_json(path, hparams)

    # Run-level files other than hparams.json go through write_file/read_file (write_tree/read_tree
    # for weights), which keep their sha256 in MANIFEST.json and verify it on every read.
    def manifest(self) -> dict[str, str] | None:
        """name -> sha256 of the run-level files; None for a store written before manifests."""
        path = self.path / MANIFEST
        if not path.exists():
            return None
        return read_sums(path)

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
        """Write a level's files atomically, then COMPLETE with their checksums (last).

        A level that is complete already (a run that grows: more seeds or arms) is replaced whole
        and crash-safely: the new level is built complete in ``level_NNN.next/`` (with every stage
        subfolder and every file the old one holds besides its checksummed files, e.g. ``quant/``,
        ``speed.parquet``, copied across: :meth:`_carry_over`), then swapped in (``level_NNN`` ->
        ``level_NNN.prev``, ``.next`` -> ``level_NNN``, ``.prev`` removed). :meth:`repair` finishes or
        rolls back a swap that a killed process left half done.
        """
        d = self.level_dir(level)
        if self.is_complete(level):
            nxt = d.with_name(d.name + NEXT)
            if nxt.exists():
                shutil.rmtree(nxt)
            self._write_level_files(nxt, files)
            self._carry_over(d, nxt, files)
            failpoint(f"built:{nxt.name}")
            atomic_write_json(nxt / COMPLETE, {"sha256": self._sums(files)})
            self._swap(d)
            return
        self._write_level_files(d, files)
        atomic_write_json(d / COMPLETE, {"sha256": self._sums(files)})

    @staticmethod
    def _carry_over(d: Path, nxt: Path, files: dict[str, bytes]) -> None:
        """Copy into the rebuilt level ``nxt`` everything of the old level ``d`` that its writer does
        not rewrite: stage folders (``quant/``, ``stability/``) and the files later commands added
        (``speed.parquet``, ``sensitivity.*``; they describe stored members, which a grow keeps bit
        for bit at their member indices). Checksummed files (in the old COMPLETE) are the writer's to
        keep; temp files of a killed writer are left behind."""
        try:
            listed = set(read_json(d / COMPLETE)["sha256"])
        except (StoreError, KeyError, TypeError):
            listed = set()
        for old in sorted(d.iterdir()):
            if old.name in files or old.name == COMPLETE or old.name in listed:
                continue
            if old.is_dir():
                shutil.copytree(old, nxt / old.name, copy_function=shutil.copy2)
            elif old.is_file() and not old.name.startswith("."):
                shutil.copy2(old, nxt / old.name)

    @staticmethod
    def _sums(files: dict[str, bytes]) -> dict[str, str]:
        return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}

    def _swap(self, d: Path) -> None:
        """Replace the level folder ``d`` by its complete ``.next`` (see :meth:`write_level`)."""
        nxt, prev = d.with_name(d.name + NEXT), d.with_name(d.name + PREV)
        if prev.exists():
            shutil.rmtree(prev)
        os.replace(d, prev)
        failpoint(f"swap:{d.name}")  # dies with the old level moved aside, the new one not yet in place
        os.replace(nxt, d)
        failpoint(f"swapped:{d.name}")
        shutil.rmtree(prev)

    def repair(self) -> list[str]:
        """Finish or roll back level swaps a killed process left half done; what was done, per folder.

        A complete ``level_NNN.next`` is swapped in (its level was built in full); an incomplete one
        is removed (the level is still the old one); a leftover ``.prev`` is removed once
        ``level_NNN`` is in place, or moved back when it is not and no complete ``.next`` exists.
        Called under the run's lock (:meth:`lock`), so no other process is writing the levels.
        """
        done = []
        if not self.path.is_dir():
            return done
        for nxt in sorted(self.path.glob(f"level_[0-9][0-9][0-9]{NEXT}")):
            d = nxt.with_name(nxt.name[: -len(NEXT)])
            if _folder_problem(nxt) is None:
                if d.exists():
                    self._swap(d)
                else:
                    os.replace(nxt, d)
                done.append(f"{d.name}: finished an interrupted swap")
            else:
                shutil.rmtree(nxt)
                done.append(f"{d.name}: removed an incomplete {nxt.name}")
        for prev in sorted(self.path.glob(f"level_[0-9][0-9][0-9]{PREV}")):
            d = prev.with_name(prev.name[: -len(PREV)])
            if d.exists():
                shutil.rmtree(prev)
                if not any(x.startswith(f"{d.name}:") for x in done):
                    done.append(f"{d.name}: removed {prev.name}, left by an interrupted swap")
            else:
                os.replace(prev, d)
                done.append(f"{d.name}: rolled back an interrupted swap")
        return done

    def _write_level_files(self, d: Path, files: dict[str, bytes]) -> None:
        d.mkdir(parents=True, exist_ok=True)
        (d / COMPLETE).unlink(missing_ok=True)
        for name, data in files.items():
            atomic_write_bytes(d / name, data)
            failpoint(f"after:{d.name}/{name}")  # dies between the files of a level

    def level_problem(self, level: int) -> str | None:
        """None when the level is complete and intact; else why it is not."""
        return _folder_problem(self.level_dir(level))

    def is_complete(self, level: int) -> bool:
        return self.level_problem(level) is None

