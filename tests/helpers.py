"""Helpers the test modules share: a tiny experiment config and random network weights.

``tests/`` is on ``sys.path`` (pytest puts the folder of the root conftest.py there), so every test
module, in any subfolder, imports them as ``from helpers import ...``.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from lth.config import ExperimentConfig

TINY = {
    "name": "tiny", "seeds": [0, 1], "arms": ["ticket", "reinit", "random_prune", "shuffle"],
    "data": {"name": "mnist1d", "mnist1d_samples": 1000, "val_size": 100},
    "model": {"name": "mlp", "widths": [24, 16]},
    "train": {"optimizer": "adam", "lr": 3e-3, "batch_size": 50, "steps": 40, "eval_every": 20},
    "prune": {"levels": 3, "rate": 0.3, "output_rate": 0.15},
    "log": {"wandb": "disabled", "progress": False},
}


def tiny(**sections) -> ExperimentConfig:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for k, v in sections.items():
        if isinstance(v, dict):
            raw[k] = {**raw.get(k, {}), **v}
        else:
            raw[k] = v
    return ExperimentConfig.from_dict(raw)


def tiny_gpt_lottery(corpus) -> ExperimentConfig:
    """A tiny byte-level GPT on the UTF-8 file ``corpus``: a dense level and one level of ticket +
    random_prune at half the attn+mlp weights (the same programs in every test that uses it)."""
    return tiny(seeds=[0], arms=["ticket", "random_prune"],
                data={"name": "text", "path": str(corpus), "context": 8, "val_size": None,
                      "mnist1d_samples": 10000},
                model={"name": "gpt", "depth": 1, "dim": 16, "heads": 2, "mlp_ratio": 2.0, "widths": [300, 100]},
                train={"optimizer": "adamw", "lr": 3e-3, "batch_size": 8, "steps": 10, "eval_every": 5,
                       "clip_norm": 1.0},
                prune={"levels": 1, "rate": 0.5, "output_rate": None})


def toml_text(d: dict) -> str:
    """An experiment file's text for a raw config dict like :data:`TINY`."""
    top = [f"{k} = {json.dumps(v)}" for k, v in d.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())
              for k, v in d.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


def random_params(model, input_shape, seed=0, density=1.0):
    """Glorot-scaled normal params with the model's tree structure (numpy: no RNG compile); kernels
    pruned at random to ``density`` when it is below 1."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))["params"]
    rng = np.random.default_rng(seed)

    def draw(s):
        if len(s.shape) == 1:
            return jnp.asarray(rng.normal(size=s.shape).astype(np.float32) * 0.1)
        fan = np.prod(s.shape[:-1]) + s.shape[-1]
        w = rng.normal(size=s.shape) * np.sqrt(2 / fan)
        if density < 1:
            w = w * (rng.random(s.shape) < density)
        return jnp.asarray(w.astype(np.float32))

    return jax.tree.map(draw, shapes)


def quadrant_images(cfg=None):
    """8x8x1 images of 4 classes: a bright quadrant per class plus noise (learnable in a few steps); a
    data loader (``cfg`` unused): (x_train, y_train, x_test, y_test)."""
    rng = np.random.default_rng(0)

    def draw(n):
        y = rng.integers(0, 4, n)
        x = rng.normal(0, 0.5, (n, 8, 8, 1)).astype(np.float32)
        for k in range(4):
            r, c = divmod(k, 2)
            x[y == k, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 1.5
        return x, y.astype(np.int32)

    (xt, yt), (xs, ys) = draw(160), draw(40)
    return xt, yt, xs, ys
