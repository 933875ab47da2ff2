"""The early-bird figure keeps runs apart: one panel per run, titled by the setting that differs."""

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.mask_figures import earlybird_distance, plt  # noqa: E402
from analysis.masks import ALL  # noqa: E402


def _eb(run_id: str, scale: float) -> pd.DataFrame:
    return pd.DataFrame([dict(run_id=run_id, seed=s, epoch=e, step=100 * e, layer=layer,
                              distance=scale * (s + 1) / e * (1 if layer == ALL else 2))
                         for s in (0, 1) for e in (1, 2, 3) for layer in (ALL, "dense_0")])


def test_each_run_gets_its_own_panel_labelled_by_the_differing_setting():
    eb = pd.concat([_eb("run_b", 0.5), _eb("run_a", 0.1)], ignore_index=True)
    labels = {"run_a": "prune.rate=0.2", "run_b": "prune.rate=0.5"}
    fig = earlybird_distance(eb, labels=labels)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["prune.rate=0.2", "prune.rate=0.5"]
    for ax, (run_id, scale) in zip(axes, (("run_a", 0.1), ("run_b", 0.5))):
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        assert set(lines) == {"all layers", "dense_0", "0.1 (You et al.)"}  # this run's lines only
        np.testing.assert_allclose(lines["all layers"].get_ydata(), scale * 1.5 / np.array([1, 2, 3]))
    plt.close(fig)
    one = earlybird_distance(_eb("run_a", 0.1))  # one run: one panel, as before
    assert len(one.axes) == 1 and "early-bird" in one.axes[0].get_title()
    plt.close(one)
