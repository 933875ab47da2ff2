"""``lth speed``: measured inference latency of each level's ticket in every format."""

from __future__ import annotations

from pathlib import Path

from .common import Command, error, int_list, add_code_arg


def add_speed(sub) -> None:
    p = sub.add_parser("speed", help="measured inference latency of each level's ticket in every format",
                       description="Time each level's ticket in every format that applies: dense with the mask "
                                   "(baseline), BCOO (jax.experimental.sparse), scipy CSR (CPU), the compact "
                                   "network (neuron/filter tickets), the int8 integer program, N:M (n:m "
                                   "tickets). Outputs are checked equal to the dense masked network first; "
                                   "latency is the best of several timed repeats after warm-up. Rows go to "
                                   "level_NNN/speed.parquet (analysis.load_speed; figures in `lth report`).")
    p.add_argument("run_dir", help="a run folder OUT/<run_id>")
    add_code_arg(p)
    p.add_argument("--levels", default=None, help="comma-separated levels (default: every complete level)")
    p.add_argument("--batch", default="1,256", help="comma-separated batch sizes (default 1,256)")
    p.add_argument("--formats", default=None,
                   help="comma-separated formats (default: all that apply): dense,bcoo,csr,compact,int8,nm")
    p.add_argument("--member", type=int, default=0, help="population member of each level (default 0: the "
                   "first seed's ticket)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats; the best is kept (default 7)")
    p.add_argument("--min-time", type=float, default=0.02,
                   help="seconds one timed repeat lasts at least (calls per repeat grow to reach it)")
    p.add_argument("--max-call", type=float, default=2.0,
                   help="a format whose one call takes longer than this many seconds is timed once")


def measure(args) -> int:
    from analysis.speed import crossover
    from ..speed import machine_info, measure_run

    batches = int_list(args.batch, "--batch")
    if min(batches) < 1:
        return error(f"--batch {args.batch!r}: batch sizes must be >= 1")
    if args.repeats < 1:
        return error(f"--repeats {args.repeats} is not allowed; expected an integer >= 1")
    levels = int_list(args.levels, "--levels") if args.levels else None
    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else None
    m = machine_info()
    print(f"machine: {m['backend']} {m['device']} ({m['cpu']}, {m['cpu_cores']} cores); python {m['python']}, "
          f"jax {m['jax']}, jaxlib {m['jaxlib']}, numpy {m['numpy']}, scipy {m['scipy']}")
    df = measure_run(args.run_dir, levels, batches, formats, member=args.member, log=print,
                     repeats=args.repeats, min_time=args.min_time, max_call_s=args.max_call)
    t = df[["level", "density", "format", "batch", "latency_s", "throughput", "speedup", "bytes", "max_abs_diff"]]
    t = t.assign(density=100 * t["density"], latency_ms=1e3 * t["latency_s"]).drop(columns="latency_s")
    print(t.sort_values(["batch", "level", "format"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    c = crossover(df)
    if not c.empty:
        print("crossover: highest weights remaining (%) from which on each format beats dense")
        for r in c.itertuples():
            cross = "never faster" if r.crossover_density != r.crossover_density else f"{100 * r.crossover_density:.3g}%"
            print(f"  {r.format:>8} batch {r.batch:<5} {cross:>13}  (best {r.best_speedup:.2f}x at "
                  f"{100 * r.best_at_density:.3g}%)")
    print(f"rows: {Path(args.run_dir)}/level_NNN/speed.parquet")
    return 0


def run_speed(args) -> int:
    from ..speed import SpeedCheckError
    try:
        return measure(args)
    except SpeedCheckError as e:
        return error(str(e))


COMMANDS = [Command("speed", add_speed, run_speed)]
