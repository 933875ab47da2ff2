"""A network defined outside lth, named in an experiment file by its import path ``tinynet:build``.

lth calls ``build(cfg, num_classes, input_shape)`` and gets a Flax module whose
``__call__(x [B, *input_shape], train=False)`` returns logits ``[B, num_classes]``. The module's
``structure()`` tells lth which units structured pruning may remove (its layer chain), so
``prune.granularity = "neuron"``, ``lth compact`` and integer inference work on it. The classifier
layer is named ``output``: lth prunes it at ``prune.output_rate``.
"""

import flax.linen as nn

from lth.models import Structure, scale_width


class TinyNet(nn.Module):
    """Flatten, two ReLU layers ``fc1``, ``fc2``, then ``output``."""

    hidden: tuple[int, int]
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden[0], name="fc1")(x))
        x = nn.relu(nn.Dense(self.hidden[1], name="fc2")(x))
        return nn.Dense(self.num_classes, name="output")(x)

    def structure(self) -> Structure:
        return Structure(chain=(
            {"op": "flatten"},
            {"op": "dense", "layer": "fc1", "relu": True},
            {"op": "dense", "layer": "fc2", "relu": True},
            {"op": "dense", "layer": "output", "relu": False},
        ))


def build(cfg, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The builder lth calls; ``cfg.width`` scales the hidden layers (small-dense baselines use it)."""
    return TinyNet((scale_width(48, cfg.width), scale_width(24, cfg.width)), num_classes)
