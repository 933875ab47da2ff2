"""lth: a JAX research harness for the Lottery Ticket Hypothesis and model compression."""

import os as _os
import sys as _sys

__version__ = "0.1.0"


COMPILE_CACHE_MAX_BYTES = 2 << 30  # lth's compile cache is trimmed to this (least recently used first)
TRIM_EVERY_S = 600  # at most one trim of a cache directory per 10 minutes (a stamp file's age)


def _use_persistent_compile_cache() -> None:
    """Keep compiled XLA programs on disk (``$LTH_COMPILE_CACHE``, default ``~/.cache/lth/jax``).

    Every level, arm group and run builds a fresh ``Engine`` whose programs have the same HLO as the
    last one's, and every sweep worker or resumed process compiles them again: the cache turns those
    compiles into file reads (measured: ``tests/lottery/test_lottery.py`` 4m40 -> 2m16 cold, 1m12 warm on
    2 cores). Results are unchanged (the cached executable is the one that would be compiled).
    ``LTH_COMPILE_CACHE=off`` disables it; a cache directory configured for jax itself wins.
    Set through jax's environment variables, so importing lth does not import jax, and sweep
    subprocesses and Ray workers on this machine inherit it.

    The size bound is lth's (:func:`trim_compile_cache`, at most once per 10 minutes, when lth is
    imported), not jax's: jax's bounded cache lists and reads every entry of the directory under a
    file lock on every write (0.26 s per compiled program with 4,900 entries, measured), which made a
    large cache slow every compile and serialized concurrent processes.
    """
    setting = _os.environ.get("LTH_COMPILE_CACHE", "").strip()
    if setting.lower() in ("0", "off", "false", "no", "none"):
        return
    if _os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    cache_home = _os.environ.get("XDG_CACHE_HOME") or _os.path.join(_os.path.expanduser("~"), ".cache")
    values = {
        "JAX_COMPILATION_CACHE_DIR": setting or _os.path.join(cache_home, "lth", "jax"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",   # our programs are many and small
        "JAX_COMPILATION_CACHE_MAX_SIZE": "-1",              # unbounded for jax; trimmed by lth (below)
    }
    jax = _sys.modules.get("jax")
    if jax is not None and jax.config.jax_compilation_cache_dir:
        return  # jax was imported first and its cache configured: leave it alone
    for key, value in values.items():
        _os.environ.setdefault(key, value)
    if jax is not None:  # jax was imported first: its flags have read the environment already
        jax.config.update("jax_compilation_cache_dir", _os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(_os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
        jax.config.update("jax_compilation_cache_max_size", int(_os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
    if _os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"].strip() == "-1":  # a bound of the caller's own: jax keeps it
        try:
            trim_compile_cache(_os.environ["JAX_COMPILATION_CACHE_DIR"])
        except OSError:
            pass  # a cache that cannot be trimmed (read-only, vanished) is still a cache


def trim_compile_cache(path: str, max_bytes: int = COMPILE_CACHE_MAX_BYTES, every_s: float = TRIM_EVERY_S) -> int:
    """Delete the least recently used compiled programs of the cache folder ``path`` until its
    programs take at most ``max_bytes``; return how many were deleted.

    Runs at most once per ``every_s`` seconds per folder (the age of its ``.lth-trimmed`` stamp), so
    importing lth in many processes costs one ``stat``. "Used" is a file's access time (or its write
    time, if later; on ``relatime`` mounts the access time moves at most once a day). An entry another
    process deletes first, or reads while it goes, is harmless: jax compiles a program whose cache
    file it cannot read.
    """
    import time

    stamp = _os.path.join(path, ".lth-trimmed")
    try:
        if time.time() - _os.stat(stamp).st_mtime < every_s:
            return 0
    except FileNotFoundError:
        if not _os.path.isdir(path):
            return 0
    with open(stamp, "w"):
        pass
    entries, total = [], 0
    with _os.scandir(path) as it:
        for e in it:
            if e.name.endswith("-cache") and e.is_file(follow_symlinks=False):
                st = e.stat(follow_symlinks=False)
                entries.append((max(st.st_atime, st.st_mtime), e.path, st.st_size))
                total += st.st_size
    removed = 0
    for _, file, size in sorted(entries):
        if total <= max_bytes:
            break
        for f in (file, file[: -len("-cache")] + "-atime"):  # jax's own access stamp, from a bounded cache
            try:
                _os.unlink(f)
            except FileNotFoundError:
                pass
        total -= size
        removed += 1
    return removed


def _one_cpu_device_per_core() -> None:
    """Expose the CPU to XLA as one device per core (at most 4; ``$LTH_CPU_DEVICES=N`` sets N, ``1``
    or ``off`` keeps jax's single CPU device).

    The engine splits a population's members between the local devices (``shard_map``), so each
    core runs its own members' steps instead of both cores sharing every small matmul: measured on
    2 cores, LeNet-300-100 K = 8: 931 -> 1194 network-steps/s, one network 786 -> 847 steps/s.
    The training data is replicated on every device (host memory, once per device), hence the cap.
    Skipped when XLA_FLAGS or JAX_NUM_CPU_DEVICES already say how many CPU devices there are, or
    when jax's backend was started before lth was imported.
    """
    setting = _os.environ.get("LTH_CPU_DEVICES", "").strip().lower()
    if setting in ("0", "1", "off", "false", "no", "none"):
        return
    flags = _os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags or _os.environ.get("JAX_NUM_CPU_DEVICES"):
        return
    try:
        cores = len(_os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = _os.cpu_count() or 1
    n = int(setting) if setting.isdigit() else min(cores, 4)
    if n <= 1:
        return
    jax = _sys.modules.get("jax")
    if jax is None:  # read by jax when its CPU backend starts (also in subprocesses and Ray workers)
        _os.environ["JAX_NUM_CPU_DEVICES"] = str(n)
        return
    try:  # jax was imported first: possible until its backend has started
        if jax.config.jax_num_cpu_devices < 0:  # not chosen by the caller
            jax.config.update("jax_num_cpu_devices", n)
    except (RuntimeError, AttributeError):
        pass  # the backend is running already: keep its devices


_use_persistent_compile_cache()
_one_cpu_device_per_core()


def __getattr__(name: str):
    """``lth.Experiment`` (:mod:`lth.experiment`), imported on first use so that ``import lth`` stays light."""
    if name == "Experiment":
        import importlib
        return importlib.import_module("lth.experiment").Experiment
    raise AttributeError(f"module 'lth' has no attribute {name!r}")
