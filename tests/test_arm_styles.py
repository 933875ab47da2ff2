"""Every arm has its own stable figure style (issue 26): one Okabe-Ito hue per family, variants apart by
marker and line style, and no two arms drawn in one figure look alike."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import figures, load_runs  # noqa: E402
from lth.config import ExperimentConfig  # noqa: E402
from lth.lottery.arms import ARMS  # noqa: E402
from lth.store import RunStore, parquet_bytes  # noqa: E402

EVERY_ARM = [*ARMS, "small_dense", "dense"]  # the registered arms and the two the runner adds
FAMILIES = {"pruning at init": ["snip", "grasp", "synflow", "snip_shuffle", "grasp_shuffle", "synflow_shuffle"],
            "sparse from scratch": ["static", "set", "rigl"],
            "one-shot": ["oneshot_magnitude", "wanda", "sparsegpt", "oneshot_magnitude_ft", "wanda_ft",
                         "sparsegpt_ft"]}
VARIANTS = [("snip", "snip_shuffle"), ("grasp", "grasp_shuffle"), ("synflow", "synflow_shuffle"),
            ("oneshot_magnitude", "oneshot_magnitude_ft"), ("wanda", "wanda_ft"), ("sparsegpt", "sparsegpt_ft"),
            ("static", "set"), ("set", "rigl")]


def _hex(c):
    return mcolors.to_hex(c)


def test_every_registered_arm_has_its_own_style_label_and_family_hue():
    palette = {_hex(c) for c in [*figures.OKABE_ITO.values(), figures.GREY]}
    styles = {a: figures.arm_style(a) for a in EVERY_ARM}
    for arm in EVERY_ARM:
        assert arm in figures.ARM_STYLE, arm  # a fixed entry, not the name-hashed fallback
        st = styles[arm]
        assert _hex(st["color"]) in palette and st["marker"] and st["linestyle"] and st["label"], arm
        assert _hex(figures.arm_color(arm)) == _hex(st["color"])
    looks = [(_hex(st["color"]), st["marker"]) for st in styles.values()]
    assert len(set(looks)) == len(looks)  # (colour, marker) apart: apart even when line styles mark runs
    labels = [st["label"] for st in styles.values()]
    assert len(set(labels)) == len(labels)
    for family, arms in FAMILIES.items():
        assert len({_hex(styles[a]["color"]) for a in arms}) == 1, family
    hues = {_hex(styles[arms[0]]["color"]) for arms in FAMILIES.values()}
    assert len(hues) == len(FAMILIES)  # one hue per family
    for a, b in VARIANTS:
        assert styles[a]["marker"] != styles[b]["marker"] and styles[a]["linestyle"] != styles[b]["linestyle"]
    assert figures.arm_style("rigl") == figures.arm_style("rigl")  # stable


def _store(root, arms, rate):
    hp = {"name": "styles", "train": {"lr": 0.1}, "seeds": [0, 1], "arms": ["ticket"], "prune": {"rate": rate}}
    run_id = ExperimentConfig.from_dict(hp).run_id
    store = RunStore(root, run_id)
    store.path.mkdir(parents=True)
    (store.path / "hparams.json").write_text(json.dumps({**hp, "run_id": run_id}))
    for level in range(3):
        rows = []
        for a_i, arm in enumerate(["ticket"] if level == 0 else arms):
            for s in (0, 1):
                for step in (10, 20):
                    for split in ("train", "val", "test"):
                        a = 0.9 - 0.002 * a_i - 0.01 * s - 0.03 * level * (arm != "ticket")
                        rows.append(dict(run_id=run_id, level=level, arm=arm, seed=s, member=2 * a_i + s,
                                         density=0.5 ** level, step=step, split=split, loss=1 - a, accuracy=a,
                                         early_stop_step=20, wall_s=1.0))
        store.write_level(level, {"metrics.parquet": parquet_bytes(pd.DataFrame(rows))})


@pytest.mark.parametrize("runs", [1, 2])
def test_no_two_arms_drawn_in_one_figure_look_alike(tmp_path, runs):
    arms = [a for a in EVERY_ARM if a != "dense"]
    for r in range(runs):
        _store(tmp_path, arms, 0.2 + 0.3 * r)
    df = load_runs(tmp_path)
    for fig in (figures.accuracy_vs_density(df), figures.pai_accuracy_vs_density(df)):
        drawn = {}
        for ln in fig.axes[0].get_lines():
            if getattr(ln, "arm", None) and ln.arm != "dense":
                look = (_hex(ln.get_color()), ln.get_linestyle(), ln.get_marker())
                assert look not in drawn.values(), (ln.arm, ln.run_id, look)
                drawn[ln.arm, ln.run_id] = look
                assert look[0] == _hex(figures.arm_color(ln.arm))
        assert len(drawn) >= runs * 2
    got = {a for a, _ in drawn}
    assert got == {"ticket", "random_prune", *FAMILIES["pruning at init"]}  # the PAI figure, last
    everything = {a for a, _ in {(ln.arm, 0) for ln in figures.accuracy_vs_density(df).axes[0].get_lines()
                                 if getattr(ln, "arm", None)}}
    assert set(arms) <= everything
    plt.close("all")
