"""Cold start of the README's main job: the same job with an empty compile cache, then again with it warm.

The job (README): ``lth sweep experiments/quickstart.toml --out runs && lth report runs --out figures``.
It runs twice in a temporary folder, each time from an empty store: first with an empty jax compile
cache (``$LTH_COMPILE_CACHE`` pointed at a new folder), then with the cache the first run filled.
The data set cache (``$LTH_CACHE_DIR``, the generated MNIST-1D) is the user's, so only compiling differs.
Each run is a fresh process of this checkout's lth (``PYTHONPATH``), so the second pays no in-process
warm-up either. Prints each run's wall seconds and the sweep's ``compiles:`` line, then

    cold_vs_warm_main_job: RATIO (cold S s, warm S s; compiles cold N (X s), warm N (X s))

``--set KEY=VALUE`` (repeatable) passes overrides to the sweep, e.g. ``--set train.epochs=2`` for a
quicker, smaller measurement (say so beside any number it gives).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "quickstart.toml"
COMPILES = re.compile(r"^compiles: (\d+) \(([\d.]+) s\); cache hits: (\d+) \(([\d.]+) s\); tracing ([\d.]+) s$", re.M)


def log(msg: str) -> None:
    print(msg, flush=True)


def main_job(workdir: Path, cache: Path, overrides: list[str], experiment: Path) -> tuple[float, str]:
    """Run the main job in ``workdir`` with the compile cache ``cache``: (wall seconds, the compiles line)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(LTH_COMPILE_CACHE=str(cache), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    sets = [a for o in overrides for a in ("--set", o)]
    for d in ("runs", "figures", "wandb"):
        shutil.rmtree(workdir / d, ignore_errors=True)
    t0 = time.perf_counter()
    sweep = subprocess.run([sys.executable, "-m", "lth", "sweep", str(experiment), "--out", "runs", "--no-progress",
                            *sets], cwd=workdir, env=env, capture_output=True, text=True)
    if sweep.returncode != 0:
        raise SystemExit(f"cold_start: lth sweep failed ({sweep.returncode}):\n{sweep.stderr[-3000:]}")
    report = subprocess.run([sys.executable, "-m", "lth", "report", "runs", "--out", "figures"], cwd=workdir, env=env,
                            capture_output=True, text=True)
    if report.returncode != 0:
        raise SystemExit(f"cold_start: lth report failed ({report.returncode}):\n{report.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    found = COMPILES.findall(sweep.stderr)
    line = "compiles: ?" if not found else "compiles: {} ({} s); cache hits: {} ({} s); tracing {} s".format(*found[-1])
    return wall, line


def short(line: str) -> str:
    m = COMPILES.search(line)
    return f"{m.group(1)} ({m.group(2)} s)" if m else "?"


def run(overrides: list[str], experiment: Path = EXPERIMENT, keep: str | None = None) -> dict:
    """Cold then warm main job; returns {"cold_s", "warm_s", "ratio", "cold_compiles", "warm_compiles"}."""
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="lth-cold-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / "compile-cache"
    shutil.rmtree(cache, ignore_errors=True)
    try:
        log(f"main job: lth sweep {experiment.relative_to(ROOT) if experiment.is_relative_to(ROOT) else experiment}"
            f" --out runs{''.join(' --set ' + o for o in overrides)} && lth report runs --out figures (in {workdir})")
        cold_s, cold = main_job(workdir, cache, overrides, experiment)
        log(f"  cold (empty compile cache): {cold_s:7.1f} s   {cold}")
        warm_s, warm = main_job(workdir, cache, overrides, experiment)
        log(f"  warm (cache filled):        {warm_s:7.1f} s   {warm}")
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    ratio = cold_s / warm_s
    log(f"cold_vs_warm_main_job: {ratio:.2f} (cold {cold_s:.1f} s, warm {warm_s:.1f} s; compiles cold {short(cold)}, "
        f"warm {short(warm)}; target <= 1.5)")
    return {"cold_s": cold_s, "warm_s": warm_s, "ratio": ratio, "cold_compiles": cold, "warm_compiles": warm}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for the sweep (repeatable), e.g. train.epochs=2 for a quick measurement")
    ap.add_argument("--experiment", default=str(EXPERIMENT), help="experiment file (default: the README's quickstart)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="run in DIR and keep it (default: a temp folder)")
    args = ap.parse_args(argv)
    run(args.overrides, Path(args.experiment).resolve(), args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
