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
