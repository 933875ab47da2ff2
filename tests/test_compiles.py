"""The compile counter (lth.compiles): real XLA compiles and persistent-cache hits, counted apart."""

import uuid

import jax
import jax.numpy as jnp
import numpy as np

from lth.cli import main
from lth.compiles import counting
from lth.lottery import run_lottery

from helpers import TINY, tiny, toml_text


def test_a_new_program_is_one_compile_and_a_rebuild_is_a_cache_hit():
    c = float(uuid.uuid4().int % 10**6)  # a constant no earlier session compiled: a cold program
    f = jax.jit(lambda x: x * c + 1.0)
    x = np.ones(3, np.float32)  # numpy input: no program of its own
    with counting() as first:
        f(x).block_until_ready()
    with counting() as again:
        f(x).block_until_ready()  # jax's in-memory cache: nothing built
    jax.clear_caches()
    with counting() as rebuilt:
        f(x).block_until_ready()  # built again: read from lth's persistent cache
    assert (first.compiles, first.hits) == (1, 0) and first.compile_s > 0
    assert first.by_name == {"jit(<lambda>)": 1}
    assert (again.compiles, again.hits) == (0, 0)
    cached = bool(jax.config.jax_compilation_cache_dir)
    assert (rebuilt.compiles, rebuilt.hits) == ((0, 1) if cached else (1, 0))


def test_the_same_tiny_level_twice_in_one_process_compiles_nothing_new(tmp_path):
    cfg = tiny(prune={"levels": 1}, train={"steps": 20, "eval_every": 10})
    with counting() as first:
        run_lottery(cfg, tmp_path / "a")
    with counting() as second:  # a fresh Lottery and Engine: the same programs, found in the cache
        run_lottery(cfg, tmp_path / "b")
    assert first.compiles + first.hits > 0
    assert second.compiles == 0, second.by_name


def test_lottery_cli_ends_with_a_compiles_line(tmp_path, capsys):
    path = tmp_path / "e.toml"
    raw = {**TINY, "seeds": [0], "prune": {**TINY["prune"], "levels": 0}, "train": {**TINY["train"], "steps": 10,
                                                                                     "eval_every": 10}}
    path.write_text(toml_text(raw))
    assert main(["lottery", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("compiles: ") and "cache hits: " in err[-1], err
    assert len(list((tmp_path / "runs").glob("*/level_000/COMPLETE"))) == 1


def test_cold_start_benchmark_reads_the_compiles_line():
    import importlib.util
    from pathlib import Path
    from lth.compiles import CompileCount
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "cold_start.py"
    spec = importlib.util.spec_from_file_location("cold_start", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    line = CompileCount(compiles=12, compile_s=8.44, hits=3, hit_s=0.1, trace_s=2.0).line()
    assert mod.short(f"something\n{line}\n") == "12 (8.4 s)"
