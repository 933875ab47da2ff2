"""Count the XLA programs a command compiles, from jax's monitoring events.

jax records ``/jax/core/compile/backend_compile_duration`` (with the program's ``fun_name``) around
every executable it builds, whether XLA compiles it or it is read from the persistent compile cache
(``$LTH_COMPILE_CACHE``, :mod:`lth`); a read also records ``/jax/compilation_cache/cache_hits`` inside
that span. So a build without a hit is a real XLA compile, and a build with one is a cache hit.
Tracing and lowering (``jaxpr_trace_duration``, ``jaxpr_to_mlir_module_duration``) are paid in both
cases and summed apart.

    with counting() as c:
        ...
    print(c.line())   # "compiles: 12 (8.4 s); cache hits: 3 (0.1 s); tracing 2.0 s"

Listeners are registered once per process and feed every active counter (nested counters each see
the events of their span). Counting is per process: a sweep's worker processes count their own.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"
TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@dataclass
class CompileCount:
    """What jax built while a counter was active: real XLA compiles and persistent-cache hits,
    their seconds, and the seconds spent tracing and lowering (paid on hits too)."""
    compiles: int = 0
    compile_s: float = 0.0
    hits: int = 0
    hit_s: float = 0.0
    trace_s: float = 0.0
    by_name: Counter = field(default_factory=Counter)  # fun_name -> real compiles
    hits_by_name: Counter = field(default_factory=Counter)  # fun_name -> cache hits

    def built(self, name: str) -> int:
        """Executables of program ``name`` (e.g. ``"jit(sharded)"``) built: compiled or read from the cache."""
        return self.by_name[name] + self.hits_by_name[name]

    def line(self) -> str:
        """``compiles: N (X s); cache hits: M (Y s); tracing Z s``: one line for a command's end."""
        return (f"compiles: {self.compiles} ({self.compile_s:.1f} s); cache hits: {self.hits} ({self.hit_s:.1f} s); "
                f"tracing {self.trace_s:.1f} s")

    def add(self, other: "CompileCount") -> None:
        """Add another process's count (a sweep worker's) to this one."""
        self.compiles += other.compiles
        self.compile_s += other.compile_s
        self.hits += other.hits
        self.hit_s += other.hit_s
        self.trace_s += other.trace_s
        self.by_name.update(other.by_name)
        self.hits_by_name.update(other.hits_by_name)

    def to_json(self) -> dict:
        return {"compiles": self.compiles, "compile_s": self.compile_s, "hits": self.hits, "hit_s": self.hit_s,
                "trace_s": self.trace_s, "by_name": dict(self.by_name), "hits_by_name": dict(self.hits_by_name)}

    @classmethod
    def from_json(cls, d: dict) -> "CompileCount":
        return cls(int(d["compiles"]), float(d["compile_s"]), int(d["hits"]), float(d["hit_s"]),
                   float(d["trace_s"]), Counter(d.get("by_name", {})), Counter(d.get("hits_by_name", {})))


_active: list[CompileCount] = []
_lock = threading.Lock()
_local = threading.local()  # whether the build running in this thread was a cache hit
_installed = False


def _on_event(event: str, **kwargs) -> None:
    if event == CACHE_HIT:
        _local.hit = True


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == BACKEND_COMPILE:
        hit, _local.hit = getattr(_local, "hit", False), False
        with _lock:
            for c in _active:
                if hit:
                    c.hits += 1
                    c.hit_s += duration
                    c.hits_by_name[str(kwargs.get("fun_name", "?"))] += 1
                else:
                    c.compiles += 1
                    c.compile_s += duration
                    c.by_name[str(kwargs.get("fun_name", "?"))] += 1
    elif event in (TRACE, LOWER):
        with _lock:
            for c in _active:
                c.trace_s += duration


def _install() -> None:
    global _installed
    if _installed:
        return
    import jax.monitoring as monitoring
    monitoring.register_event_listener(_on_event)
    monitoring.register_event_duration_secs_listener(_on_duration)
    _installed = True


@contextlib.contextmanager
def counting() -> Iterator[CompileCount]:
    """Count what jax compiles in this process while the block runs (see the module doc)."""
    _install()
    count = CompileCount()
    with _lock:
        _active.append(count)
    try:
        yield count
    finally:
        with _lock:  # by identity: two counters with equal tallies compare equal
            _active[:] = [c for c in _active if c is not count]
