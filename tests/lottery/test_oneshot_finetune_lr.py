"""*_ft arms never fine-tune at lr 0 (the default lr is train's final lr, 0 after a cosine decay)."""

import pytest

from helpers import tiny
from lth.config import ConfigError
from lth.lottery.runner import Lottery


def test_ft_arms_under_a_schedule_ending_at_zero_need_an_explicit_lr(tmp_path):
    cosine = {"schedule": "cosine", "steps": 20}
    with pytest.raises(ConfigError, match=r"arms \['wanda_ft'\]: the default prune.oneshot_finetune_lr .* is 0 "
                                          r"with train.schedule = 'cosine'; set prune.oneshot_finetune_lr"):
        Lottery(tiny(arms=["ticket", "wanda_ft"], train=cosine), tmp_path, progress=False)
    Lottery(tiny(arms=["ticket", "wanda"], train=cosine), tmp_path, progress=False)  # no fine-tuning: fine
    Lottery(tiny(arms=["ticket", "wanda_ft"], train=cosine, prune={"oneshot_finetune_lr": 1e-3}), tmp_path,
            progress=False)


def test_plain_oneshot_rows_of_a_language_model_carry_bits_per_byte():
    import numpy as np
    from lth.lottery.oneshot import evaluate_records

    class LM:  # an engine on text (a context window) evaluating 2 members
        window = 8

        def evaluate(self, state):
            return {"val": (np.array([np.log(2) * 3, np.log(2)]), np.array([0.4, 0.6]))}

    rows = evaluate_records(LM(), None)
    assert [r["bits_per_byte"] for r in rows] == pytest.approx([3.0, 1.0])
    assert [r["perplexity"] for r in rows] == pytest.approx([8.0, 2.0])
    LM.window = 0  # images: no LM columns
    assert "bits_per_byte" not in evaluate_records(LM(), None)[0]
