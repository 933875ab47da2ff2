"""``lth train`` and ``lth lottery``: run one experiment file (train + prune, then quantize)."""

from __future__ import annotations

import sys
import time

from .common import Command, add_experiment_args, error, print_summary


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train the dense network (or a given mask) of every seed as one population",
                       description="Train the dense network for every seed in `seeds` as one vmapped "
                                   "population (prune.levels is ignored) and write OUT/<run_id>/"
                                   "hparams.json plus level_000/metrics.parquet. With --mask, train that "
                                   "mask instead: each seed starts from its own init (the dense run's) with "
                                   "the mask applied, and pruned weights stay exactly 0. The run id then "
                                   "also hashes the mask, and hparams.json records its path and sha256 "
                                   "under `mask`.")
    add_experiment_args(p)
    p.add_argument("--mask", default=None, metavar="MASK",
                   help="train this mask instead of the dense network: a stored level folder "
                        "(OUT/<run_id>/level_003) or its masks.msgpack (members.json beside it names each "
                        "member's arm and seed). Each seed takes the mask of the same seed; a seed without "
                        "one is an error unless the arm has a single member, which is then shared by every "
                        "seed. A file without members.json must hold one mask (shared by every seed). The "
                        "mask must match the model's layers and shapes exactly")
    p.add_argument("--mask-arm", default=None, metavar="ARM",
                   help="with --mask: the arm whose masks are used (ticket, reinit, random_prune, shuffle, snip, grasp, "
                        "synflow and their *_shuffle; default: ticket)")


def add_lottery(sub) -> None:
    p = sub.add_parser("lottery", help="iterative magnitude pruning with rewinding and controls",
                       description="Run IMP: level 0 trains dense; each level prunes prune.rate of the "
                                   "remaining weights by magnitude, rewinds and retrains every arm x seed "
                                   "as one population. Rerunning resumes at the first incomplete level; a "
                                   "finished run does no training.")
    add_experiment_args(p)


def run_experiment_file(args, train_only: bool) -> int:
    from ..experiment import Experiment

    exp = Experiment.from_toml(args.experiment, args.overrides + args.settings)
    mask, mask_arm = getattr(args, "mask", None), getattr(args, "mask_arm", None)
    if mask_arm is not None and mask is None:
        return error("--mask-arm needs --mask (the mask file or stored level to train)")
    if mask is not None:
        from ..lottery.masked import train_masked
        t0 = time.time()
        store = train_masked(exp.config, args.out, mask, mask_arm or "ticket",
                             progress=not args.no_progress and exp.config.log.progress)
        print_summary(store.path, time.time() - t0)
        return 0
    if train_only:
        sc = exp.config.stability  # level 0 only: the dense network's copies, if [stability] gives the ticket arm any
        on = sc.enabled and (sc.arms is None or "ticket" in sc.arms)
        exp = exp.set(**{"prune.levels": 0, "arms": ["ticket"], "quant": None, "stability.arms": None,
                         "stability.levels": "all", "stability.enabled": on})
    t0 = time.time()
    log = None if args.no_progress else (lambda msg: print(f"{'lth' if 'stability' in msg else 'quant'}: {msg}",
                                                           file=sys.stderr, flush=True))
    store = exp.execute(args.out, progress=not args.no_progress and exp.config.log.progress, log=log)
    print_summary(store.path, time.time() - t0, exp.results(args.out))  # the members asked for, not all stored
    return 0


def run_train(args) -> int:
    return run_experiment_file(args, train_only=True)


def run_lottery(args) -> int:
    return run_experiment_file(args, train_only=False)


COMMANDS = [Command("train", add_train, run_train), Command("lottery", add_lottery, run_lottery)]
