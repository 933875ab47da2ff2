"""Test-session settings, applied before any test module imports jax.

The tests train many tiny networks, so their time is mostly XLA compiling (on a cold compile cache,
as in CI's fresh clone, three quarters of the suite). Two XLA CPU settings cut it:

- LLVM optimization level 0 halves LLVM's part (tests check results, not speed);
- XLA:CPU's older loop emitters instead of its MLIR fusion emitters (``--xla_cpu_use_fusion_emitters=
  false``; jax's default since 2025), with the LLVM module compiled in one piece
  (``--xla_cpu_parallel_codegen_split_count=1``): the MLIR emitters take most of a small program's
  compile time, and the split costs more threads than it saves on two busy cores. The train segment
  of the tiny MLP of ``helpers.TINY`` compiles in 0.7 s instead of 2.2 s, a tiny lottery with its
  stability and quant stages in 3 s instead of 11 s (docs/notes/coldsuite.md). Together the two give
  the same bits as jax's defaults at level 0 on every tiny model measured (MLP, BN conv net, ViT, GPT;
  the emitters alone do not). Set only where the installed jaxlib knows the flags: XLA aborts on an
  unknown one.

Subprocesses started by tests (kill-and-resume, concurrent sweeps, Ray workers) inherit them.
Compiled programs are shared between the test processes through lth's persistent compile cache.
The tests also keep jax's single CPU device (``LTH_CPU_DEVICES=1``; lth would expose one device per
core): the population programs then need no SPMD partitioning, which compiles faster. Tests of
several devices set the device count themselves.
"""

import importlib.util
import mmap
import os
from pathlib import Path

OPT_LEVEL = "--xla_backend_optimization_level=0"
LOOP_EMITTERS = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")


def xla_knows(flag: str) -> bool:
    """Whether the installed jaxlib's XLA has the flag ``--name=value`` (its name is in jaxlib's shared
    libraries, read without importing jax, whose XLA reads the flags once)."""
    name = flag.lstrip("-").split("=")[0].encode()
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    for lib in Path(next(iter(spec.submodule_search_locations))).glob("*.so"):
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(name) >= 0:
                return True
    return False


def _add_xla_flags(*flags: str) -> None:
    have = os.environ.get("XLA_FLAGS", "")
    new = [f for f in flags if f.split("=")[0] not in have]
    if new:
        os.environ["XLA_FLAGS"] = " ".join([have, *new]).strip()


_add_xla_flags(OPT_LEVEL, *(LOOP_EMITTERS if all(map(xla_knows, LOOP_EMITTERS)) else ()))
os.environ.setdefault("LTH_CPU_DEVICES", "1")


# The test files of the longest cold runs, longest first (wall seconds per file in the README's test
# command on an empty compile cache, 2 workers, quiet: docs/speed.md, "The cold test suite").
# ``--dist loadfile`` hands whole files to the workers in collection order: starting with the longest
# and ending with the many short ones keeps both workers busy to the end instead of one finishing a
# long file alone. Files not listed keep their order, after these.
SLOW_FILES = (
    "tests/test_faults.py",
    "tests/test_train.py",
    "tests/lottery/test_grow.py",
    "tests/test_augment.py",
    "tests/test_registry.py",
    "tests/test_sweep.py",
    "tests/test_cli.py",
    "tests/test_accelerator_path.py",
    "tests/test_pipeline.py",
    "tests/test_models.py",
    "tests/test_vit.py",
    "tests/lottery/test_lottery.py",
    "tests/test_gpt.py",
    "tests/lottery/test_dst_arms.py",
    "tests/test_speed.py",
    "tests/prune/test_oneshot.py",
    "tests/quant/test_gptq_stage.py",
    "tests/quant/test_gptq_export.py",
    "tests/quant/test_quant.py",
    "tests/lottery/test_stability.py",
    "tests/lottery/test_oneshot_arms.py",
    "tests/prune/test_structured.py",
    "tests/test_analysis.py",
    "tests/test_experiment.py",
)


def slow_files_first(items: list) -> list:
    """``items`` (collected tests, by ``nodeid``) with the files of :data:`SLOW_FILES` first, in that
    order; the order inside a file and of the other files is kept."""
    rank = {f: i for i, f in enumerate(SLOW_FILES)}
    return sorted(items, key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_configure(config):
    # pytest-xdist >= 3.6 orders loadfile's files by their number of tests unless told not to
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    items[:] = slow_files_first(items)
