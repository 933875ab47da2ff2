"""The transformer recipes load, say what they reproduce, and the GPU one is the cited ViT-Tiny."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.config import load_experiment
from lth.models import build_model

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["vit_fmnist", "vit_cifar10", "gpt_text"]


@pytest.mark.parametrize("name", RECIPES)
def test_transformer_recipes_say_what_they_reproduce(name):
    path = ROOT / "experiments" / f"{name}.toml"
    head = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#")).lower()
    assert "new measurement" in head or "reproduces" in head
    cfg = load_experiment(path)
    assert cfg.name == name and cfg.model.name in ("vit", "gpt")


def test_vit_cifar10_is_deit_tiny_on_32px_with_crop_flip_and_late_rewinding():
    cfg = load_experiment(ROOT / "experiments/vit_cifar10.toml")
    assert "Touvron et al. 2021" in (ROOT / "experiments/vit_cifar10.toml").read_text()
    m = cfg.model
    assert (m.dim, m.depth, m.heads, m.mlp_ratio, m.patch) == (192, 12, 3, 4.0, 4)
    assert cfg.data.name == "cifar10" and cfg.data.augment == "crop_flip"
    assert cfg.train.optimizer == "adamw" and cfg.train.weight_decay == 0.05 and cfg.train.schedule == "cosine"
    assert cfg.train.lr == pytest.approx(5e-4 * cfg.train.batch_size / 512)  # DeiT's linear lr scaling
    steps_per_epoch = (50000 - cfg.data.val_size) // cfg.train.batch_size
    assert abs(cfg.train.warmup_steps - 5 * steps_per_epoch) <= steps_per_epoch // 10  # 5 warmup epochs
    assert 0 < cfg.rewind.step == cfg.train.warmup_steps
    model = build_model(cfg.model, 10, (32, 32, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert 5.2e6 < n < 5.8e6  # DeiT-Ti: 5M parameters at 224 px (fewer positions here, a 10-way head)
