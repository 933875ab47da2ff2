"""Test-session settings, applied before any test module imports jax.

The tests train many tiny networks, so their time is mostly XLA compiling: LLVM optimization level 0
halves it (tests check results, not speed; every comparison inside a test runs under the same
flags). Subprocesses started by tests (kill-and-resume, concurrent sweeps, Ray workers) inherit it.
Compiled programs are shared between the test processes through lth's persistent compile cache.
The tests also keep jax's single CPU device (``LTH_CPU_DEVICES=1``; lth would expose one device per
core): the population programs then need no SPMD partitioning, which compiles faster. Tests of
several devices set the device count themselves.
"""

import os

_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
os.environ.setdefault("LTH_CPU_DEVICES", "1")
