"""XLA compile seconds of tiny pipelines under the test session's XLA flags, and whether they change results.

Runs one tiny case (``run_experiment`` into OUT, persistent compile cache off, one CPU device) and prints
the XLA compile seconds (jax's ``backend_compile_duration`` events, summed), the number of programs,
and a hash of every stored number (each msgpack leaf; each parquet column but wall times). Run it
once per ``XLA_FLAGS`` setting and compare: equal hashes mean the flags changed no stored result.

    for f in "" "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"; do
        rm -rf /tmp/o; XLA_FLAGS="--xla_backend_optimization_level=0 $f" \\
            python benchmarks/compile_flags.py vit /tmp/o
    done

Cases: mlp (``tests/helpers.py``'s TINY, one level, stability, PTQ/QAT/GPTQ), sgd (TINY with SGD
momentum, cosine, warmup, weight decay), conv (a VGG of two convs with batch norm on 8x8 images,
stability, PTQ), vit (one block on 8x8 images, PTQ/QAT), gpt (``helpers.tiny_gpt_lottery``).
"""

import hashlib
import os
import sys
import time
from pathlib import Path

os.environ["LTH_COMPILE_CACHE"] = "off"
os.environ.setdefault("LTH_CPU_DEVICES", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from jax import monitoring  # noqa: E402

import lth.data  # noqa: E402
from helpers import quadrant_images, tiny, tiny_gpt_lottery  # noqa: E402
from lth.models import POOL, VGG, register  # noqa: E402
from lth.pipeline import run_experiment  # noqa: E402
from lth.store import load_tree  # noqa: E402

COMPILE = [0.0, 0]


def _on_duration(event, duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILE[0] += duration
        COMPILE[1] += 1


blob_images = quadrant_images  # 8x8x1 images of 4 classes, as tests/test_vit.py uses


STAGES = {"stability": {"enabled": True, "points": 3, "levels": [1], "bn_batches": 2},
          "quant": {"bits": [4], "method": ["ptq", "qat", "gptq"], "qat_steps": 2, "levels": [1],
                    "calib_batches": 2}}
BLOBS = {"name": "compile_flags_blobs", "val_size": 20}


def config(case: str, out: Path):
    if case == "mlp":
        return tiny(prune={"levels": 1}, train={"steps": 6, "eval_every": 3}, **STAGES)
    if case == "sgd":
        return tiny(prune={"levels": 1}, train={"optimizer": "sgd", "momentum": 0.9, "schedule": "cosine",
                                                "warmup_steps": 2, "lr": 0.05, "steps": 6, "eval_every": 3,
                                                "weight_decay": 1e-4})
    if case == "conv":
        return tiny(data=BLOBS, model={"name": "compile_flags_bnconv", "widths": [300, 100]}, prune={"levels": 1},
                    arms=["ticket", "reinit"], train={"steps": 6, "eval_every": 3, "batch_size": 10},
                    **{**STAGES, "quant": {**STAGES["quant"], "method": ["ptq"]}})
    if case == "vit":
        return tiny(data=BLOBS, model={"name": "vit", "widths": [300, 100], "patch": 4, "dim": 16, "depth": 1,
                                       "heads": 2, "mlp_ratio": 2.0},
                    seeds=[0], arms=["ticket", "random_prune"],
                    train={"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05, "batch_size": 20, "steps": 8,
                           "eval_every": 4},
                    prune={"levels": 1, "rate": 0.3},
                    quant={"bits": [8], "method": ["ptq", "qat"], "qat_steps": 2, "levels": [1], "calib_batches": 2})
    if case == "gpt":
        corpus = out.parent / (out.name + "-corpus.txt")
        corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
        return tiny_gpt_lottery(corpus)
    raise SystemExit(f"unknown case {case!r}; cases: mlp, sgd, conv, vit, gpt")


def stored_hash(out: Path) -> str:
    h = hashlib.md5()
    for f in sorted(out.rglob("*")):
        if f.suffix == ".msgpack":
            for x in jax.tree.leaves(load_tree(f)):
                h.update(np.asarray(x).tobytes())
        elif f.suffix == ".parquet":
            df = pd.read_parquet(f)
            df = df[[c for c in df.columns if not any(w in c for w in ("wall", "time", "_s", "seconds"))]]
            h.update(pd.util.hash_pandas_object(df, index=True).values.tobytes())
    return h.hexdigest()[:12]


def main(case: str, out: str) -> None:
    lth.data.register(BLOBS["name"], val_size=20, num_classes=4)(blob_images)
    register("compile_flags_bnconv")(lambda cfg, n, shape: VGG((4, POOL, 8), n, cfg.init))
    out = Path(out)
    cfg = config(case, out)
    monitoring.register_event_duration_secs_listener(_on_duration)
    t = time.time()
    run_experiment(cfg, out, progress=False)
    print(f"{case}: wall {time.time() - t:.1f} s, XLA compile {COMPILE[0]:.1f} s in {COMPILE[1]} programs, "
          f"results {stored_hash(out)}  (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python benchmarks/compile_flags.py CASE OUT")
    main(*sys.argv[1:])
