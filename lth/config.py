"""Experiment configuration: frozen dataclasses per section, TOML files, ``--set`` overrides.

An experiment file is TOML with top-level keys ``name``, ``seeds``, ``arms`` and one table per
section (``[data]``, ``[model]``, ``[train]``, ``[prune]``, ``[rewind]``, ``[log]``). Every value is
validated before any work starts; a bad value raises :class:`ConfigError` naming the key, the value,
what is allowed and where it came from.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import hashlib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .registry import CRITERIA, DATASETS, MODELS, RegistryError


class ConfigError(ValueError):
    """A bad experiment setting. The message names the key, the value and what is allowed."""


_NO_LEGACY = object()


def _spec(check=None, allowed: str | None = None, result: bool = True, doc: str = "", legacy=_NO_LEGACY,
          applies=None):
    """Field metadata: an extra predicate with its human description, and whether it changes results.

    ``legacy``: for a field added with a default that changes results, the value that stores written
    before it existed were computed with; ``applies(cfg)``: whether the field changes this run's results
    at all. The run id then leaves the legacy value out instead of the default, and the field out where
    it does not apply (:func:`_with_legacy_fields`), so old stores keep their ids and a run that the new
    default changes gets a new one; a stored hparams.json without the field reads as the legacy value
    (:func:`legacy_filled`)."""
    return {"check": check, "allowed": allowed, "result": result, "doc": doc, "legacy": legacy, "applies": applies}


def _f(default, **kw):
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata=_spec(**kw))


# The current version of a pruning criterion's numerics, for each criterion (``name`` or ``name/hessian``)
# whose numbers changed after runs were stored with them: prune.numerics_version enters the run id of
# those runs only, and a stored run without it reads as version 1. A fix of another criterion adds its
# entry here (a later fix of the same one bumps it, and prune.numerics_version's default with it).
CRITERION_NUMERICS = {"obd/fisher": 2}  # 2: the per-example empirical Fisher (was the batch-mean gradient squared)


# The version of each quant method's numerics where a fix changed the numbers one setting gives (every other
# method: 1); lth.quant.stage keys its cells by it, so cells computed before a fix are recomputed, and the
# readers of the store skip them. ``qat+lsq``: QAT with learned scales.
QUANT_NUMERICS = {"qat+lsq": 2}  # 2: LSQ's gradient at the ends of the range (Esser et al. 2020, Eq. 3)


def quant_numerics_version(method: str, options: dict) -> int:
    """The current version of the numerics of quant ``method`` with ``options`` (a cell's setting)."""
    name = "qat+lsq" if method == "qat" and options.get("learned_scale") else method
    return QUANT_NUMERICS.get(name, 1)


def stale_numerics(setting: Any) -> str | None:
    """Why a stored quant cell (its marker's ``setting``) was computed with older numerics than its method's
    current ones, or None when it is current (or records no setting)."""
    if not isinstance(setting, dict):
        return None
    have, want = setting.get("numerics_version", 1), quant_numerics_version(str(setting.get("method")), setting)
    if isinstance(have, int) and have < want:
        return f"computed with {setting.get('method')} numerics version {have}, now {want}"
    return None


def _criterion_numerics_key(pc) -> str:
    return f"{pc.criterion}/{pc.hessian}" if pc.criterion == "obd" else pc.criterion


_pos = (lambda v: v > 0, "a number > 0")
_nonneg = (lambda v: v >= 0, "a number >= 0")
_frac = (lambda v: 0 <= v < 1, "a fraction in [0, 1)")
# The step counter of a train state is int32; a longer run would wrap its schedule around.
MAX_STEPS = 2**31 - 1
# Points of a stability path: the path program holds a loss and an error per point and test example
# (and vmaps over the points off CPU); Frankle et al. 2020 use 30.
MAX_PATH_POINTS = 1000


ARMS = ("ticket", "reinit", "random_prune", "shuffle", "small_dense", "snip", "grasp", "synflow", "snip_shuffle",
        "grasp_shuffle", "synflow_shuffle", "static", "set", "rigl", "oneshot_magnitude", "wanda", "sparsegpt",
        "oneshot_magnitude_ft", "wanda_ft", "sparsegpt_ft")
DST_ARMS = ("static", "set", "rigl")  # sparse from scratch (lth.prune.dst)
PAI_ARMS = ("snip", "grasp", "synflow", "snip_shuffle", "grasp_shuffle", "synflow_shuffle")  # pruning at init
# one-shot pruning of the trained dense network (lth.lottery.arms), evaluated as pruned; *_ft: fine-tuned
ONESHOT_ARMS = ("oneshot_magnitude", "wanda", "sparsegpt")
ONESHOT_FT_ARMS = ("oneshot_magnitude_ft", "wanda_ft", "sparsegpt_ft")
# Quantization settings (lth.quant implements them; listed here so config imports no quantization code)
QUANT_BITS = (8, 4, 3, 2, 1)
QUANT_SCHEMES = ("sym", "asym")
QUANT_GRANULARITIES = ("channel", "tensor")
QUANT_CALIBRATIONS = ("minmax", "percentile", "mse")
QUANT_METHODS = ("ptq", "qat", "gptq", "sparsegpt_gptq")
GPTQ_METHODS = ("gptq", "sparsegpt_gptq")
# Model, data set and criterion names are not listed here: lth.registry resolves them (registered
# names, entry points, "package.module:callable"); which structured granularities a model supports is
# declared by the model (lth.models.Structure) and checked once it is built.


# False while only hashing a stored run's settings (stored_run_id): reading a store needs no model code
_RESOLVE_NAMES = contextvars.ContextVar("lth_resolve_names", default=True)


def _check_entry(registry, key: str, name: str) -> None:
    """ConfigError (one line) unless ``name`` is a registered name, an entry point or a well-formed
    import path of ``registry``; imports no user code (that happens when work starts)."""
    if not _RESOLVE_NAMES.get():
        return
    try:
        registry.check_name(name)
    except RegistryError as e:
        raise ConfigError(f"{key} = {name!r}: {e}") from None


@dataclass(frozen=True)
class DataConfig:
    name: str = _f("mnist1d", doc="data set: a registered name, an entry point of group lth.datasets, or an "
                                  "import path 'package.module:loader' of loader(cfg: DataConfig) -> (x_train, y_train, x_test, y_test) (lth.registry)")
    val_size: int | None = _f(
        None, check=_nonneg[0], allowed="an integer >= 0",
        doc="examples held out of train for validation; default 5000 (image sets) or 500 (mnist1d)")
    normalize: bool = _f(True, doc="standardize inputs with the train split's mean and std (per channel for "
                                   "images, e.g. CIFAR-10's RGB; one scalar for flat inputs)")
    mnist1d_samples: int = _f(10000, check=lambda v: v >= 100, allowed="an integer >= 100",
                              doc="total examples generated for mnist1d (80% train, 20% test)")
    split_seed: int = _f(0, doc="seed of the train/val split (the same for every member)")
    train_size: int = _f(
        0, check=_nonneg[0], allowed="an integer >= 0 (0 = the whole train split)",
        doc="train on a subset of this many examples of the train split (after the val hold-out), drawn "
            "with split_seed, for quick trials; 0 = all. Checked against the split's size when the data loads")
    augment: Literal["none", "crop_flip"] = _f(
        "none", doc="training-batch augmentation of image data sets, on the device inside the compiled step. "
                    "crop_flip: a random crop of the image's own size from it zero-padded by 4 pixels, and a "
                    "random horizontal flip, per example, keyed by (the member's data seed, step); "
                    "eval is never augmented")
    path: str | None = _f(None, doc="data.name = 'text': a UTF-8 file or a folder of them (read in sorted "
                                    "order, recursively), bytes as tokens")
    context: int = _f(128, check=lambda v: v >= 1, allowed="an integer >= 1",
                      doc="text data sets (text, pystdlib): tokens (bytes) per window; an example is "
                          "x = bytes[i:i+context], y = bytes[i+1:i+context+1]")

    def __post_init__(self):
        _check_entry(DATASETS, "data.name", self.name)
        if self.augment != "none" and self.name == "mnist1d":
            raise ConfigError(f"data.augment = {self.augment!r} is not allowed with data.name = 'mnist1d' "
                              "(1-D signals, not images); use data.augment = 'none', or an image data set")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("mlp", doc="architecture: a registered name, an entry point of group lth.models, or an import path "
                              "'package.module:builder' of builder(cfg: ModelConfig, num_classes, input_shape) -> "
                              "flax Module (lth.registry; the run id includes the name)")
    widths: tuple[int, ...] = _f((300, 100), check=lambda v: all(w >= 1 for w in v),
                                 allowed="a list of positive integers",
                                 doc="hidden widths of the mlp (before the width multiplier)")
    width: float = _f(1.0, check=_pos[0], allowed=_pos[1],
                      doc="multiplier on every hidden layer's width (small-dense baselines)")
    init: Literal["glorot_normal", "kaiming_normal"] = _f("glorot_normal", doc="weight init scheme")
    depth: int = _f(4, check=lambda v: v >= 1, allowed="an integer >= 1", doc="transformer blocks (vit, gpt)")
    dim: int = _f(128, check=lambda v: v >= 1, allowed="an integer >= 1",
                  doc="transformer embedding width (vit, gpt); the width multiplier scales it")
    heads: int = _f(4, check=lambda v: v >= 1, allowed="an integer >= 1",
                    doc="attention heads per block (vit, gpt); must divide dim")
    mlp_ratio: float = _f(4.0, check=_pos[0], allowed=_pos[1],
                          doc="MLP hidden width of a transformer block as a multiple of dim (vit, gpt)")
    context: int = _f(0, check=_nonneg[0], allowed="an integer >= 0",
                      doc="gpt: positions of the learned position embedding; 0 = the data's window "
                          "(data.context); windows longer than this are an error")
    tie_embeddings: bool = _f(False, doc="gpt: the output head is the transposed token embedding (no head "
                                          "layer of its own)")
    patch: int = _f(4, check=lambda v: v >= 1, allowed="an integer >= 1",
                    doc="vit: side of the square patches (must divide the image's height and width)")
    pool: Literal["cls", "mean"] = _f("cls", doc="vit: the head reads a learned CLS token (cls) or the mean "
                                                 "of the patch tokens (mean)")

    def __post_init__(self):
        _check_entry(MODELS, "model.name", self.name)


@dataclass(frozen=True)
class TrainConfig:
    optimizer: Literal["sgd", "adam", "adamw"] = _f(
        "adam", doc="optax optimizer; adamw: Adam with decoupled weight decay (Loshchilov & Hutter 2019) of "
                    "train.weight_decay times the step's lr")
    lr: float = _f(1.2e-3, check=_pos[0], allowed=_pos[1], doc="peak learning rate")
    momentum: float = _f(0.0, check=_frac[0], allowed=_frac[1], doc="sgd momentum")
    nesterov: bool = _f(False, doc="nesterov momentum for sgd")
    weight_decay: float = _f(0.0, check=_nonneg[0], allowed=_nonneg[1],
                             doc="L2 penalty coefficient (decoupled decay with optimizer = adamw)")
    clip_norm: float | None = _f(None, check=_pos[0], allowed="a number > 0 or none",
                                 doc="clip the gradient to this global L2 norm before the optimizer; none = no clipping")
    batch_size: int = _f(60, check=lambda v: v >= 1, allowed="an integer >= 1", doc="examples per step")
    epochs: int | None = _f(None, check=lambda v: v >= 1, allowed="an integer >= 1",
                            doc="training length in passes over the train split (default 10; not with steps)")
    steps: int | None = _f(None, check=lambda v: 1 <= v <= MAX_STEPS, allowed=f"an integer in [1, {MAX_STEPS}]",
                           doc="training length in steps (not with epochs)")
    schedule: Literal["constant", "step", "cosine"] = _f("constant", doc="learning-rate schedule")
    milestones: tuple[int, ...] = _f((), check=lambda v: all(m >= 1 for m in v) and list(v) == sorted(v),
                                     allowed="an increasing list of steps >= 1",
                                     doc="steps at which the 'step' schedule multiplies lr by gamma")
    gamma: float = _f(0.1, check=_pos[0], allowed=_pos[1], doc="factor of the 'step' schedule")
    warmup_steps: int = _f(0, check=_nonneg[0], allowed="an integer >= 0",
                           doc="linear warmup from 0 to lr over this many steps")
    eval_every: int | None = _f(None, check=lambda v: v >= 1, allowed="an integer >= 1",
                                doc="steps between evaluations; default once per epoch")
    eval_batch_size: int = _f(1000, check=lambda v: v >= 1, allowed="an integer >= 1",
                              doc="examples per evaluation chunk (memory only)")
    shared_data_order: bool = _f(False, doc="all members see the same batches (else one order per seed)")
    member_batch: int | None = _f(
        None, result=False, check=lambda v: v >= 1, allowed="an integer >= 1 or none",
        doc="members of a population computed together (vmapped) within each device's share; the rest "
            "run one after another in the same compiled program. none = auto: 1 on CPU (each member's "
            "weights and optimizer state stay in cache; batched small matmuls are slow there), the "
            "whole population on GPU/TPU. Speed only: results agree to float rounding")
    segment: Literal["auto", "scan", "step"] = _f(
        "auto", result=False,
        doc="how a segment between evaluations runs: scan = one compiled lax.scan over its steps; step = "
            "one compiled step at a time, dispatched from the host (for XLA CPU, which runs convolutions "
            "other than NHWC x HWIO far slower inside a loop). auto: step on CPU for models with such "
            "convolutions, else scan. Speed only: both run the same steps in the same order, with the same "
            "results to float rounding (XLA may fuse a step differently inside a loop)")

    def __post_init__(self):
        if self.epochs is not None and self.steps is not None:
            raise ConfigError(f"train.epochs = {self.epochs} and train.steps = {self.steps} are both set; "
                              "set one of them (e.g. --set train.steps=none --set train.epochs=5)")


@dataclass(frozen=True)
class PruneConfig:
    levels: int = _f(0, check=_nonneg[0], allowed="an integer >= 0", doc="IMP levels after the dense one (not part of the run id: more levels grow a stored run)")
    rate: float = _f(0.2, check=_frac[0], allowed=_frac[1],
                     doc="fraction of remaining fully-connected weights pruned per level")
    output_rate: float | None = _f(None, check=_frac[0], allowed=_frac[1],
                                   doc="rate for the output layer; default rate / 2 (Frankle & Carbin)")
    conv_rate: float | None = _f(None, check=_frac[0], allowed=_frac[1],
                                 doc="rate for convolution kernels; default rate")
    scope: Literal["layerwise", "global"] = _f("layerwise", doc="rank weights per layer or over all layers")
    exclude: tuple[str, ...] = _f((), doc="layer names never pruned")
    prune_biases: bool = _f(False, doc="also prune biases (never by default)")
    rates: dict[str, float] | None = _f(
        None, check=lambda v: all(0 <= r < 1 for r in v.values()), allowed="a table of layer = rate in [0, 1)",
        doc="per-layer rates overriding rate/conv_rate/output_rate, e.g. {dense_0 = 0.3} "
            "(lth sensitivity --to-rates derives them); keys are layer names or the layer kinds a model "
            "declares (vit: attn = q, k, v, out of every block; mlp = fc_in, fc_out; embed = the patch "
            "embedding; head = the classifier), a layer's own name winning over its kind. vit prunes attn "
            "and mlp at prune.rate by default; embed and head only when named here; the position "
            "embedding, CLS token and layer norms never")
    granularity: Literal["weight", "neuron", "filter", "layer", "head", "n:m"] = _f(
        "weight", doc="unit removed: single weights, whole fc neurons, whole conv filters (with the next "
                      "layer's matching inputs and the filter's batch-norm entries), or whole residual "
                      "blocks (layer: prune.rate of the surviving identity-shortcut blocks, rounded half "
                      "up); n:m keeps prune.n of every prune.m consecutive input weights (lth.nm: each "
                      "level drops round_half_up(rate * k), at least 1, of the k survivors of every "
                      "group until n remain); the model declares which units it has (lth.models.Structure: "
                      "built-in neuron: mlp, lenet_300_100, conv2/4/6, vit, gpt (a transformer's MLP hidden "
                      "units; lth.prune.units); filter: conv2/4/6 and vgg11/16/19; "
                      "layer: resnet20; head: vit, gpt; n:m: any). head: whole attention heads (their q, k, v "
                      "output columns and the out projection's matching input rows; lth.prune.heads), prune.rate "
                      "(or the rate prune.rates gives attn) of every attention's surviving heads per level")
    n: int = _f(2, check=lambda v: v >= 1, allowed="an integer >= 1",
                doc="granularity n:m: weights kept in every group of m (2 of 2:4)")
    m: int = _f(4, check=lambda v: v >= 2, allowed="an integer >= 2",
                doc="granularity n:m: group size, consecutive input weights of one output (4 of 2:4)")
    structure_norm: Literal["l1", "l2"] = _f(
        "l2", doc="norm ranking neurons/filters (of their incoming weights) and blocks (of the scale of "
                  "their last batch norm)")
    criterion: str = _f(
        "magnitude", doc="score ranking the weights (higher = keep), a registered name: magnitude |w|, random, "
                         "saliency |w * grad| (snip is the same score), obd w^2 H_ii / 2 (OBD), grasp w * (H g) "
                         "(GraSP, keeps the highest), synflow |w * dR/dw| of the |w| network (one evaluation in "
                         "IMP), ...; or an entry point of group "
                         "lth.criteria, or an import path 'package.module:score' of score(params, signals) -> scores (lth.registry)")
    criterion_batches: int = _f(4, check=lambda v: v >= 1, allowed="an integer >= 1",
                                doc="train batches the saliency/snip/grasp/obd signals are averaged over")
    synflow_rounds: int = _f(100, check=lambda v: v >= 1, allowed="an integer >= 1",
                             doc="SynFlow pruning rounds of the synflow arms (exponential density schedule "
                                 "per layer, Tanaka et al. 2020)")
    pai_allocation: Literal["global", "ticket"] = _f(
        "global", legacy="ticket", applies=lambda cfg: bool(set(cfg.arms) & set(PAI_ARMS)),
        doc="how the pruning-at-init arms (snip, grasp, synflow and their shuffles) spend the ticket's survivors. "
            "global: as published (and in Frankle et al. 2021), each method ranks every prunable weight "
            "together and keeps the ticket's overall count, choosing its own per-layer densities (synflow: "
            "the exponential schedule on the global density); the *_shuffle arms permute within each layer "
            "at those counts. ticket: each layer keeps its highest scores, as many as the ticket keeps there "
            "(the ticket's layer budget filled by another score; the only behaviour of stores written "
            "before this setting, which read as ticket)")
    grasp_temperature: float = _f(
        200.0, check=_pos[0], allowed=_pos[1], legacy=1.0,
        applies=lambda cfg: bool({"grasp", "grasp_shuffle"} & set(cfg.arms)) or cfg.prune.criterion == "grasp",
        doc="GraSP's softmax temperature T: its g and Hg are of the cross-entropy of logits / T (the "
            "authors run T = 200; 1 = no temperature, as stores written before this setting)")
    hessian: Literal["hutchinson", "fisher"] = _f(
        "hutchinson", doc="diagonal Hessian estimate for obd: hutchinson (unbiased diag(H), Rademacher probes) "
                          "or fisher (the per-example empirical Fisher diagonal, mean of squared per-example "
                          "gradients; PSD)")
    hessian_samples: int = _f(8, check=lambda v: v >= 1, allowed="an integer >= 1",
                              doc="Hutchinson probes per batch for obd")
    numerics_version: int = _f(
        CRITERION_NUMERICS["obd/fisher"], check=lambda v: v in (1, 2), allowed="1 or 2", legacy=1,
        applies=lambda cfg: _criterion_numerics_key(cfg.prune) in CRITERION_NUMERICS,
        doc="version of the criterion's numerics, in the run id only for criteria whose numerics changed after "
            "runs were stored with them (CRITERION_NUMERICS), so such runs are not reused as current. obd with "
            "hessian = 'fisher': 2 = the per-example empirical Fisher diagonal; 1 = the squared batch-mean "
            "gradient (about 1/B of it) of runs stored before the fix, which read as 1 (lth trains only the "
            "current version)")
    schedule: Literal["imp", "oneshot", "gradual"] = _f(
        "imp", doc="imp: iterative with rewinding; oneshot: prune once to target_density and retrain; "
                   "gradual: AGP (Zhu & Gupta 2017) during one training run, no rewinding")
    target_density: float = _f(0.1, check=lambda v: 0 < v <= 1, allowed="a fraction in (0, 1]",
                               doc="final density of the oneshot and gradual schedules")
    agp_start_step: int = _f(0, check=_nonneg[0], allowed="an integer >= 0", doc="AGP: first mask update t0")
    agp_frequency: int = _f(100, check=lambda v: v >= 1, allowed="an integer >= 1",
                            doc="AGP: steps between mask updates (dt)")
    agp_updates: int = _f(10, check=lambda v: v >= 1, allowed="an integer >= 1",
                          doc="AGP: number of mask updates n (final sparsity reached at t0 + n dt)")
    distribution: Literal["erk", "uniform", "ticket"] = _f(
        "erk", applies=lambda cfg: bool(set(cfg.arms) & set(DST_ARMS)),
        doc="per-layer budgets of the sparse-from-scratch arms (static, set, rigl) at the ticket's overall "
            "count: erk (Evci et al. 2020, density ~ (n_in + n_out) / (n_in n_out), layers over 1 made dense), "
            "uniform (every prunable layer at the same density) or ticket (the ticket's per-layer counts)")
    dst_delta_t: int = _f(100, check=lambda v: v >= 1, allowed="an integer >= 1",
                          applies=lambda cfg: bool({"set", "rigl"} & set(cfg.arms)),
                          doc="set/rigl: steps between mask updates (updates at global steps dt, 2 dt, ...)")
    dst_end: float = _f(0.75, check=lambda v: 0 <= v <= 1, allowed="a fraction in [0, 1]",
                        applies=lambda cfg: bool({"set", "rigl"} & set(cfg.arms)),
                        doc="set/rigl: no mask update from this fraction of training on (global step "
                            "round(dst_end * steps))")
    dst_drop_fraction: float = _f(0.3, check=lambda v: 0 <= v <= 1, allowed="a fraction in [0, 1]",
                                  applies=lambda cfg: bool({"set", "rigl"} & set(cfg.arms)),
                                  doc="set/rigl: drop fraction alpha at step 0, cosine-annealed to 0 at dst_end "
                                      "(RigL Eq. 1)")
    calib_batches: int = _f(8, check=lambda v: 1 <= v <= 4096, allowed="an integer in [1, 4096]",
                            doc="training batches (the seed's first) whose inputs calibrate the wanda and "
                                "sparsegpt arms (the papers use 128 sequences)")
    oneshot_allocation: Literal["ticket", "uniform"] = _f(
        "ticket", doc="per-layer densities of the one-shot arms: ticket (each layer at the IMP ticket's density "
                      "there at that level) or uniform (every prunable layer at the ticket's overall density)")
    oneshot_finetune_steps: int = _f(100, check=lambda v: 1 <= v <= MAX_STEPS, allowed=f"an integer in [1, {MAX_STEPS}]",
                                     doc="steps the *_ft one-shot arms (wanda_ft, ...) fine-tune, mask kept")
    oneshot_finetune_lr: float | None = _f(None, check=_pos[0], allowed=_pos[1],
                                           doc="constant learning rate of the *_ft one-shot arms; default the "
                                               "final learning rate of train's schedule")

    def __post_init__(self):
        _check_entry(CRITERIA, "prune.criterion", self.criterion)
        if self.schedule == "gradual" and self.granularity != "weight":
            raise ConfigError(f"prune.granularity = {self.granularity!r} is not allowed with prune.schedule = "
                              "'gradual' (AGP prunes single weights by magnitude); use prune.granularity = "
                              "'weight', or prune.schedule = 'imp' or 'oneshot' for structured pruning")
        if self.granularity == "n:m" and not self.n < self.m:
            raise ConfigError(f"prune.n = {self.n} and prune.m = {self.m} are not allowed with prune.granularity "
                              "= 'n:m'; expected 1 <= n < m (e.g. n = 2, m = 4)")
        if self.granularity == "n:m" and self.criterion != "magnitude":
            raise ConfigError(f"prune.criterion = {self.criterion!r} is not allowed with prune.granularity = "
                              "'n:m' (N:M keeps the largest |w| of every group); use prune.criterion = 'magnitude'")


@dataclass(frozen=True)
class RewindConfig:
    step: int = _f(0, check=_nonneg[0], allowed="an integer >= 0",
                   doc="rewind point: 0 = init (original LTH), k = weights at step k of the dense run")
    mode: Literal["weights", "lr", "finetune"] = _f(
        "weights", doc="weights: rewind weights; lr: keep weights, replay lr schedule; finetune: keep "
                       "weights, constant small lr")
    finetune_lr: float | None = _f(None, check=_pos[0], allowed=_pos[1],
                                   doc="lr for mode=finetune; default the schedule's final lr")


@dataclass(frozen=True)
class LogConfig:
    wandb: Literal["offline", "online", "disabled"] = _f("offline", result=False,
                                                        doc="Weights & Biases mode")
    project: str = _f("lth", result=False, doc="W&B project")
    progress: bool = _f(True, result=False, doc="show a progress bar")


def _all_of(allowed):
    return {"check": lambda v: len(v) >= 1 and all(x in allowed for x in v) and _unique(v),
            "allowed": "a non-empty list of distinct values from " + ", ".join(map(str, allowed))}


@dataclass(frozen=True)
class QuantConfig:
    """The ``[quant]`` stage: every list setting is swept; each (level, arm, setting) is one cell.

    Not part of the training run id: changing only ``quant.*`` never retrains a level; quant
    results are keyed by a hash of (run id, the cell's settings) (:mod:`lth.quant.stage`).
    """

    bits: tuple[int, ...] = _f((8, 4, 2), **_all_of(QUANT_BITS), doc="weight bit widths to sweep (1 = binary)")
    method: tuple[str, ...] = _f(("ptq",), **_all_of(QUANT_METHODS), doc="ptq, qat and/or gptq (Frantar et al. 2023: layer by "
                                  "layer, rounding errors absorbed by the layer's not yet rounded weights; min-max grid "
                                  "per channel or per quant.group_size inputs, whatever quant.granularity and "
                                  "quant.calibration say); sparsegpt_gptq: SparseGPT + GPTQ in one pass (Frantar & "
                                  "Alistarh 2023, Sec. 3.5), pruning each layer further to quant.joint_density among "
                                  "the member's surviving weights")
    scheme: tuple[str, ...] = _f(("sym",), **_all_of(QUANT_SCHEMES),
                                 doc="sym (signed, Z = 0) and/or asym (unsigned with zero point)")
    granularity: tuple[str, ...] = _f(("channel",), **_all_of(QUANT_GRANULARITIES),
                                      doc="weight scales per output channel and/or per tensor")
    calibration: tuple[str, ...] = _f(("minmax",), **_all_of(QUANT_CALIBRATIONS),
                                      doc="range methods to sweep (with retry: the order tried)")
    activations: bool = _f(True, doc="also quantize the input of every Dense/Conv (else weights only)")
    act_bits: int = _f(8, check=lambda v: 2 <= v <= 8, allowed="an integer in [2, 8]", doc="activation bits")
    act_scheme: Literal["sym", "asym"] = _f("asym", doc="activation scheme")
    percentile: float = _f(99.99, check=lambda v: 50 < v <= 100, allowed="a number in (50, 100]",
                           doc="percentile calibration: clip at the 100-p and p percentiles")
    calib_batches: int = _f(8, check=lambda v: v >= 1, allowed="an integer >= 1",
                            doc="training batches (train.batch_size each) used for calibration")
    retry: bool = _f(False, doc="try the calibration methods in order until the val accuracy drop (a language "
                                "model: the val bits per byte gained) is within tolerance; record the one chosen")
    tolerance: float = _f(0.005, check=_nonneg[0], allowed=_nonneg[1],
                          doc="allowed val accuracy drop for retry (0.01 = 1 point); for a language model, "
                              "allowed val bits per byte gained")
    bias_correction: bool = _f(False, doc="PTQ: empirical bias correction (Nagel et al. 2019)")
    cle: bool = _f(False, doc="PTQ: cross-layer equalization before quantizing (Nagel et al. 2019)")
    group_size: int | None = _f(None, check=lambda v: v >= 1, allowed="an integer >= 1 (or none: per channel)",
                                doc="GPTQ: one scale (and zero point) per group of this many inputs of an output "
                                    "channel (the paper: 128); none: one per output channel")
    joint_density: float = _f(0.5, check=lambda v: 0 < v <= 1, allowed="a number in (0, 1]",
                              doc="sparsegpt_gptq: fraction of each layer's weights kept (at most its survivors: a "
                                  "ticket sparser than this is only quantized; the paper: 0.5)")
    act_order: bool = _f(False, doc="GPTQ: quantize the inputs in order of decreasing Hessian diagonal (act-order)")
    gptq_damp: float = _f(0.01, check=lambda v: 0 < v <= 1, allowed="a number in (0, 1]",
                          doc="GPTQ: dampening of H = X^T X, as a fraction of its mean diagonal")
    learned_scale: bool = _f(False, doc="QAT learns the scales (LSQ) instead of recomputing ranges")
    qat_steps: int | None = _f(None, check=lambda v: 1 <= v <= MAX_STEPS, allowed=f"an integer in [1, {MAX_STEPS}]",
                               doc="QAT fine-tuning steps; default one epoch (full training from the rewind point)")
    qat_lr: float | None = _f(None, check=_pos[0], allowed=_pos[1],
                              doc="QAT learning rate (constant); default train.lr / 10")
    qat_start: Literal["trained", "rewind"] = _f("trained",
                                                 doc="QAT starts from the trained network or from the rewind point")
    levels: Literal["all", "last"] | tuple[int, ...] = _f(
        "all", check=lambda v: isinstance(v, str) or (len(v) >= 1 and all(x >= 0 for x in v) and _unique(v)),
        allowed="'all', 'last' or a non-empty list of distinct levels >= 0",
        doc="levels whose members are quantized (listed levels past prune.levels are skipped)")
    arms: tuple[Literal["ticket", "reinit", "random_prune", "shuffle", "small_dense", "snip", "grasp", "synflow",
                   "snip_shuffle", "grasp_shuffle", "synflow_shuffle", "static", "set", "rigl", "oneshot_magnitude",
                   "wanda", "sparsegpt", "oneshot_magnitude_ft", "wanda_ft", "sparsegpt_ft"], ...] | None = _f(
        None, check=lambda v: len(v) >= 1 and _unique(v), allowed="a non-empty list of distinct arms",
        doc="arms quantized; default every arm of the run (the dense level 0 is the ticket arm's level 0)")

    @classmethod
    def from_dict(cls, d: dict, where: str = "quant") -> "QuantConfig":
        return _build(cls, d, "quant.", where)

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(dataclasses.asdict(self))

    def to_json_key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class StabilityConfig:
    """The ``[stability]`` stage: linear-mode-connectivity instability (Frankle et al. 2020).

    Each (arm, seed) of the chosen levels trains a second copy that differs only in SGD noise (its
    batch order and dropout rng); after the level, test error is evaluated along the straight line
    between the two final networks (:mod:`lth.lottery.stability`). Not part of the run id: the
    copies are extra members, and the other members' results do not change.
    """

    enabled: bool = _f(False, result=False, doc="train a second copy of each chosen (arm, seed) and "
                                                "measure the error barrier between the two")
    points: int = _f(30, result=False, check=lambda v: 2 <= v <= MAX_PATH_POINTS,
                     allowed=f"an integer in [2, {MAX_PATH_POINTS}]",
                     doc="evenly spaced points of the linear path between the copies, endpoints included")
    arms: tuple[Literal["ticket", "reinit", "random_prune", "shuffle", "snip", "grasp", "synflow", "snip_shuffle",
                        "grasp_shuffle", "synflow_shuffle", "oneshot_magnitude_ft", "wanda_ft", "sparsegpt_ft"], ...] | None = _f(
        None, result=False, check=lambda v: len(v) >= 1 and _unique(v), allowed="a non-empty list of distinct "
        "arms (not small_dense)", doc="arms that get copies; default every arm of the run but small_dense "
                                      "(the dense level 0 counts as the ticket arm)")
    levels: Literal["all", "last"] | tuple[int, ...] = _f(
        "all", result=False,
        check=lambda v: isinstance(v, str) or (len(v) >= 1 and all(x >= 0 for x in v) and _unique(v)),
        allowed="'all', 'last' or a non-empty list of distinct levels >= 0",
        doc="levels whose members get copies (listed levels past prune.levels are skipped)")
    bn_batches: int = _f(8, result=False, check=lambda v: v >= 1, allowed="an integer >= 1",
                         doc="batch-norm models: training batches (train.batch_size each) whose mean batch "
                             "statistics replace the running statistics at every point of the path")

    @classmethod
    def from_dict(cls, d: dict, where: str = "stability") -> "StabilityConfig":
        return _build(cls, d, "stability.", where)

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(dataclasses.asdict(self))


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "train": TrainConfig, "prune": PruneConfig,
    "rewind": RewindConfig, "log": LogConfig, "quant": QuantConfig, "stability": StabilityConfig,
}


# PRNG keys take 32-bit seeds (2**32 would give seed 0's key again) and lth offsets a seed by up to
# 2_000_003 for its other random streams (lth.prune.criteria.HESSIAN_KEY); numpy seeds must be >= 0.
SEED_LIMIT = 2**32 - 2_000_003


def _unique(v):
    return len(set(v)) == len(v)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = _f("experiment", result=False, doc="experiment name (W&B group, figure titles)")
    seeds: tuple[int, ...] = _f((0,), check=lambda v: len(v) >= 1 and _unique(v)
                                and all(0 <= s < SEED_LIMIT for s in v),
                                allowed=f"a non-empty list of distinct integers in [0, {SEED_LIMIT})",
                                doc="one member per seed (not part of the run id: more seeds grow a stored run)")
    arms: tuple[Literal["ticket", "reinit", "random_prune", "shuffle", "small_dense", "snip", "grasp", "synflow",
                   "snip_shuffle", "grasp_shuffle", "synflow_shuffle", "static", "set", "rigl", "oneshot_magnitude",
                   "wanda", "sparsegpt", "oneshot_magnitude_ft", "wanda_ft", "sparsegpt_ft"], ...] = _f(
        ("ticket",), check=lambda v: len(v) >= 1 and _unique(v) and v[0] == "ticket",
        allowed="a list of distinct arms starting with 'ticket'",
        doc="ticket and controls (reinit, random_prune, shuffle), small_dense baselines, and pruning-at-init "
            "arms at the ticket's per-layer counts from the ticket's start weights (snip, grasp, synflow) "
            "with their layerwise-shuffle ablations (snip_shuffle, grasp_shuffle, synflow_shuffle), sparse from "
            "scratch from the ticket's start weights at its overall count (static: a random mask kept fixed; set, "
            "rigl: drop and grow every prune.dst_delta_t steps), one-shot pruning of the trained dense network "
            "(oneshot_magnitude, wanda, sparsegpt: evaluated as pruned; their *_ft arms fine-tuned for "
            "prune.oneshot_finetune_steps); not part of "
            "the run id: more arms grow a stored run")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    rewind: RewindConfig = field(default_factory=RewindConfig)
    log: LogConfig = field(default_factory=LogConfig)
    quant: QuantConfig | None = field(default=None, metadata=_spec(
        result=False, doc="the quantization stage ([quant] table); none: no quant stage"))
    stability: StabilityConfig = field(default_factory=StabilityConfig, metadata=_spec(
        result=False, doc="the instability stage ([stability] table)"))

    def __post_init__(self):
        if self.quant is not None:
            check_quant(self, self.quant, "[quant]")
        if self.stability.enabled:
            check_stability(self, self.stability, "[stability]")
        g = self.prune.granularity
        if g == "layer" and {"random_prune", "shuffle"} & set(self.arms):
            # both controls permute a mask within each leaf; a dropped block's leaves are all False
            # and a kept block's all True, so they would reproduce the ticket's mask exactly
            raise ConfigError(f"arms = {list(self.arms)} is not allowed with prune.granularity = 'layer': "
                              "random_prune and shuffle permute weights within each layer, which leaves whole-"
                              "block masks unchanged; use arms from 'ticket', 'reinit', 'small_dense'")
        _check_dst_arms(self)
        if self.prune.schedule == "gradual" and set(self.arms) - {"ticket"}:
            # AGP prunes the one member it trains, during training; a control would need its own schedule
            raise ConfigError(f"arms = {list(self.arms)} is not allowed with prune.schedule = 'gradual': AGP "
                              "prunes the trained network during one run and trains no controls; set "
                              "arms = ['ticket'], or use prune.schedule = 'imp' or 'oneshot' for controls")

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "ExperimentConfig":
        return _build(cls, d, "", where)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "json") -> "ExperimentConfig":
        return cls.from_dict(json.loads(text), where)

    def replace(self, **sections) -> "ExperimentConfig":
        return dataclasses.replace(self, **sections)

    # ------------------------------------------------------------------ identity
    def result_dict(self) -> dict[str, Any]:
        """The fields that change results, omitting those at their default.

        Omitting defaults keeps old run ids valid when a new field with a default is added. A field
        whose new default changes results (``legacy`` in its metadata) is left out at its legacy value
        instead, and where it does not apply to the run (:func:`_with_legacy_fields`).
        """
        return _with_legacy_fields(self, _result_fields(self))

    def identity_dict(self) -> dict[str, Any]:
        """What names a run's results: :meth:`result_dict` without ``prune.levels``, ``seeds`` and
        ``arms``, which say how many members the run holds, not what each member computes (a run
        grows by more levels, seeds or arms instead of being recomputed)."""
        d = self.result_dict()
        for key in GROWABLE_TOP:
            d.pop(key, None)
        prune = {k: v for k, v in d.get("prune", {}).items() if k not in GROWABLE_PRUNE}
        if prune:
            d["prune"] = prune
        else:
            d.pop("prune", None)
        return d

    @property
    def run_id(self) -> str:
        """Hash of :meth:`identity_dict`: equal for runs that differ only in levels, seeds or arms."""
        blob = json.dumps(self.identity_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def legacy_run_id(self) -> str:
        """The run id of stores written before runs could grow (it hashed levels, seeds and arms too);
        such stores stay readable and ``lth migrate`` renames them to :attr:`run_id`."""
        blob = json.dumps(self.result_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# settings that say how many members a run holds (not part of its run id: the run grows)
GROWABLE_TOP = ("seeds", "arms")
GROWABLE_PRUNE = ("levels",)


def check_numerics(cfg: "ExperimentConfig") -> None:
    """ConfigError when a run would be computed with numerics lth no longer has (``prune.numerics_version``
    of a stored run written before its criterion's fix: it can be read, not trained further)."""
    current = CRITERION_NUMERICS.get(_criterion_numerics_key(cfg.prune))
    if current is not None and cfg.prune.numerics_version != current:
        raise ConfigError(f"prune.numerics_version = {cfg.prune.numerics_version} is the numerics of "
                          f"{_criterion_numerics_key(cfg.prune)} in runs stored before its fix; lth computes "
                          f"only version {current}: remove the setting (a new run id)")


def _check_dst_arms(cfg: "ExperimentConfig") -> None:
    """The sparse-from-scratch arms drop and grow single weights (lth.prune.dst) at the count of a ticket
    pruned level by level: with whole neurons, filters, heads or n:m groups (prune.granularity) their masks
    would not be of that granularity, and AGP (prune.schedule = 'gradual') prunes every member itself."""
    dst = [a for a in cfg.arms if a in DST_ARMS]
    if not dst:
        return
    pc = cfg.prune
    if pc.granularity != "weight":
        raise ConfigError(f"arms {dst} are not allowed with prune.granularity = {pc.granularity!r}: static, set "
                          "and rigl drop and grow single weights (unstructured); use prune.granularity = 'weight' "
                          "with them, or leave them out of arms")
    if pc.schedule == "gradual":
        raise ConfigError(f"arms {dst} are not allowed with prune.schedule = 'gradual' (AGP prunes every member "
                          "during one run); use prune.schedule = 'imp' or 'oneshot' with them, or leave them out "
                          "of arms")


def check_quant(cfg: "ExperimentConfig", qc: QuantConfig, where: str) -> None:
    """ConfigError unless the quant stage ``qc`` fits the run ``cfg`` (its arms and levels)."""
    _check_stage_members(cfg, "quant", qc.arms, qc.levels, cfg.arms, where)
    check_gptq_settings(qc, where)
    if qc.qat_start == "rewind" and "qat" in qc.method:
        oneshot = [a for a in (qc.arms or cfg.arms) if a.removesuffix("_ft") in ONESHOT_ARMS]
        if oneshot:  # they were never trained from a rewind point: the trained dense network, pruned
            raise ConfigError(f"{where}: quant.qat_start = 'rewind' is not allowed for the one-shot arms {oneshot}: "
                              "they were not trained from the rewind point (they are the trained dense network, "
                              "pruned), so QAT would restart them from a point they never had; use "
                              "quant.qat_start = 'trained', or list the other arms in quant.arms")
        moved = [a for a in (qc.arms or cfg.arms) if a in ("set", "rigl")]
        if moved:  # static keeps its mask from the start: restarting it is how it was trained
            raise ConfigError(f"{where}: quant.qat_start = 'rewind' is not allowed for the arms {moved}: their masks "
                              "moved during training (drop and grow), so restarting QAT from the rewind point with "
                              "the final mask is not how they were trained; use quant.qat_start = 'trained', or "
                              "list the other arms in quant.arms")


def check_gptq_settings(qc: QuantConfig, where: str) -> None:
    """GPTQ's settings are refused where no gptq cell would read them, and binary widths with gptq."""
    default = QuantConfig()
    if "sparsegpt_gptq" not in qc.method and qc.joint_density != default.joint_density:
        raise ConfigError(f"{where}: quant.joint_density = {qc.joint_density!r} is a sparsegpt_gptq setting, but "
                          f"quant.method = {list(qc.method)} has no sparsegpt_gptq; add it or remove the setting")
    if set(GPTQ_METHODS) & set(qc.method):
        if 1 in qc.bits:
            raise ConfigError(f"{where}: quant.bits = {list(qc.bits)} with quant.method gptq: GPTQ needs bits >= 2 "
                              "(1 = binary has no grid to round to); drop 1 or run it with ptq/qat only")
        return
    for name in ("group_size", "act_order", "gptq_damp"):
        if getattr(qc, name) != getattr(default, name):
            raise ConfigError(f"{where}: quant.{name} = {_to_jsonable(getattr(qc, name))!r} is a GPTQ setting, "
                              f"but quant.method = {list(qc.method)} has no gptq; add gptq or remove it")


def _check_stage_members(cfg: "ExperimentConfig", section: str, arms, levels, listed, where: str) -> None:
    """A later stage's ``arms`` must be arms the run trains (``listed`` in the error); levels past the end
    are skipped (a quick trial with fewer prune.levels keeps its table), but a list with no level of the
    run is a mistake."""
    if arms is not None and set(arms) - set(cfg.arms):
        raise ConfigError(f"{where}: {section}.arms = {list(arms)} names arms the run does not train; its arms: "
                          f"{', '.join(listed)}")
    if not isinstance(levels, str) and min(levels) > cfg.prune.levels:
        raise ConfigError(f"{where}: {section}.levels = {list(levels)} names no level of the run (prune.levels = "
                          f"{cfg.prune.levels}); use levels 0..{cfg.prune.levels}, 'all' or 'last'")


def check_stability(cfg: "ExperimentConfig", sc: StabilityConfig, where: str) -> None:
    """ConfigError unless the stability stage ``sc`` fits the run ``cfg`` (its arms, levels, data order)."""
    _check_stage_members(cfg, "stability", sc.arms, sc.levels, [a for a in cfg.arms if a != "small_dense"], where)
    if cfg.train.shared_data_order:
        raise ConfigError(f"{where}: stability.enabled = true is not allowed with train.shared_data_order = true "
                          "(the two copies must see different batch orders); set train.shared_data_order = false")
    if cfg.prune.schedule == "gradual":
        raise ConfigError(f"{where}: stability.enabled = true is not allowed with prune.schedule = 'gradual' (AGP "
                          "changes the masks during training, so the copies would not share one); use 'imp' or "
                          "'oneshot'")


def check_against_model(cfg: ExperimentConfig, layers: dict[str, str], num_steps: int,
                        kinds: tuple[str, ...] = ()) -> None:
    """Settings only the built model and schedule can check, before any level trains.

    ``layers`` maps every layer name of the model (``dense_0``, ``stage1/block0/conv1``) to the kind
    of its kernel (``dense``, ``conv``, ``output``; ``other`` for layers without one); ``num_steps``
    is the training length; ``kinds``: the layer kinds the model declares for prune.rates (``attn``,
    ``mlp``, ...: :attr:`lth.models.Structure.kinds`). ConfigError naming the key, the value and the
    valid names otherwise.
    """
    kernels = sorted(k for k, kind in layers.items() if kind in ("dense", "conv", "output"))
    for name in (cfg.prune.rates or {}):
        if name not in kernels and name not in kinds:
            also = f"; its layer kinds: {', '.join(sorted(set(kinds)))}" if kinds else ""
            raise ConfigError(f"prune.rates names layer {name!r}, which model {cfg.model.name} does not have; "
                              f"its prunable layers: {', '.join(kernels)}{also}")
    parts = {p for k in layers for i, p in enumerate(k.split("/"))} | {
        "/".join(k.split("/")[:i + 1]) for k in layers for i in range(k.count("/") + 1)}
    for name in cfg.prune.exclude:
        if name not in parts:
            raise ConfigError(f"prune.exclude names layer {name!r}, which model {cfg.model.name} does not have; "
                              f"its layers: {', '.join(sorted(layers))}")
    check_numerics(cfg)
    if cfg.rewind.step > num_steps:
        raise ConfigError(f"rewind.step = {cfg.rewind.step} is past the end of training ({num_steps} steps); "
                          f"expected an integer in [0, {num_steps}]")
    if cfg.model.widths != ModelConfig().widths and cfg.model.name in MODELS.entries and cfg.model.name != "mlp":
        raise ConfigError(f"model.widths = {list(cfg.model.widths)} is not used by model.name = "
                          f"{cfg.model.name!r} (only by 'mlp'); remove it, or scale the model with model.width")
    check_model_fields(cfg.model)


# The model settings that only some built-in models read (a user's model may read any of them).
MODEL_FIELDS = {"depth": ("vit", "gpt"), "dim": ("vit", "gpt"), "heads": ("vit", "gpt"), "mlp_ratio": ("vit", "gpt"),
                "context": ("gpt",), "tie_embeddings": ("gpt",), "patch": ("vit",), "pool": ("vit",)}


def check_model_fields(mc: ModelConfig) -> None:
    """ConfigError when a setting of :data:`MODEL_FIELDS` is set (not at its default) on a built-in model
    that ignores it, e.g. ``model.depth`` on a conv net: a setting that does nothing is a mistake."""
    if not MODELS.is_builtin(mc.name):
        return
    default = ModelConfig()
    for name, users in MODEL_FIELDS.items():
        v = getattr(mc, name)
        if mc.name not in users and v != getattr(default, name):
            raise ConfigError(f"model.{name} = {_to_jsonable(v)!r} is not used by model.name = {mc.name!r} (only by "
                              f"{', '.join(map(repr, users))}); remove it")


def _legacy_fields():
    """``(section, field)`` of every section field with a ``legacy`` value."""
    for sec in dataclasses.fields(ExperimentConfig):
        tp = sec.default_factory  # the sections that are always there (a [quant] table may be None)
        if not dataclasses.is_dataclass(tp):
            continue
        for f in dataclasses.fields(tp):
            if f.metadata.get("legacy", _NO_LEGACY) is not _NO_LEGACY:
                yield sec, f


def _with_legacy_fields(cfg: "ExperimentConfig", d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (:func:`_result_fields` of ``cfg``) with each field that has a ``legacy`` value in it only where
    it applies to ``cfg`` and differs from the legacy value: a store written before the field existed
    hashes to its old id, and a run that the new default changes to a new one."""
    for sec, f in _legacy_fields():
        if not sec.metadata.get("result", True):
            continue
        part = dict(d.get(sec.name, {}))
        part.pop(f.name, None)
        v = getattr(getattr(cfg, sec.name), f.name)
        applies = f.metadata.get("applies")
        if v != f.metadata["legacy"] and (applies is None or applies(cfg)):
            part[f.name] = _to_jsonable(v)
        if part:
            d[sec.name] = part
        else:
            d.pop(sec.name, None)
    return d


def legacy_filled(hparams: dict[str, Any]) -> dict[str, Any]:
    """A stored run's settings with every field it lacks that has a ``legacy`` value set to that value
    (the run was computed before the field existed, with the legacy behaviour)."""
    out = dict(hparams)
    for sec, f in _legacy_fields():
        if isinstance(out.get(sec.name), dict) and f.name not in out[sec.name]:
            out[sec.name] = {**out[sec.name], f.name: f.metadata["legacy"]}
    return out


def stored_run_id(hparams: dict[str, Any], where: str = "hparams.json", *, legacy: bool = False) -> str:
    """The run id that a stored ``hparams.json`` hashes to (its settings; for a ``train --mask`` run
    also its ``mask`` entry, as :func:`lth.lottery.masked.run_id` does). ``legacy``: the id under the
    scheme before runs could grow (:attr:`ExperimentConfig.legacy_run_id`; a ``train --mask`` run has
    one scheme only). ConfigError if they do not validate."""
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    token = _RESOLVE_NAMES.set(False)  # hashing only: a user model's module need not be importable here
    try:
        cfg = ExperimentConfig.from_dict({k: v for k, v in legacy_filled(hparams).items() if k in names}, where)
    finally:
        _RESOLVE_NAMES.reset(token)
    mask = hparams.get("mask")
    if not isinstance(mask, dict):
        return cfg.legacy_run_id if legacy else cfg.run_id
    digest = {"sha256": mask.get("sha256"), "members_sha256": mask.get("members_sha256"), "arm": mask.get("arm"),
              "source_seeds": [None if s == -1 else s for s in mask.get("source_seeds") or []]}
    blob = json.dumps({"config": cfg.result_dict(), "mask": digest}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------- helpers

def _to_jsonable(x):
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    return x


def _result_fields(obj) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if not f.metadata.get("result", True):
            continue
        if dataclasses.is_dataclass(v):
            sub = _result_fields(v)
            if sub:
                out[f.name] = sub
            continue
        if not f.metadata.get("result", True):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if v != default:
            out[f.name] = _to_jsonable(v)
    return out


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is dict:
        return "a table of " + _type_name(typing.get_args(tp)[1]).removeprefix("a ").removeprefix("an ") + "s"
    if origin is tuple:
        return "a list of " + _type_name(typing.get_args(tp)[0]).removeprefix("a ").removeprefix("an ")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


_NO = object()


def _coerce(tp, v):
    """Return v converted to type tp, or _NO when it does not fit."""
    if type(v).__module__ == "numpy" and hasattr(v, "tolist"):  # np.int64(3), np.array([0, 1]): numbers, lists
        v = v.tolist()
    origin = typing.get_origin(tp)
    if origin is Literal:
        return v if isinstance(v, str) and v in typing.get_args(tp) else _NO
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in typing.get_args(tp):
            return None
        for a in typing.get_args(tp):
            if a is not type(None):
                c = _coerce(a, v)
                if c is not _NO:
                    return c
        return _NO
    if origin is dict:
        if not isinstance(v, dict):
            return _NO
        kt, vt = typing.get_args(tp)
        items = {_coerce(kt, k): _coerce(vt, x) for k, x in v.items()}
        return _NO if any(k is _NO or x is _NO for k, x in items.items()) else items
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            return _NO
        items = [_coerce(typing.get_args(tp)[0], x) for x in v]
        return _NO if any(i is _NO for i in items) else tuple(items)
    if tp is bool:
        return v if isinstance(v, bool) else _NO
    if tp is int:
        return v if isinstance(v, int) and not isinstance(v, bool) else _NO
    if tp is float:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else _NO
    if tp is str:
        return v if isinstance(v, str) else _NO
    raise TypeError(f"unsupported config type {tp}")


def _section_type(tp):
    """The dataclass of a section field (``QuantConfig | None`` included), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def _finite(v) -> bool:
    """False when ``v`` is or holds a non-finite float."""
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return all(_finite(x) for x in v)
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    return True


def _build(cls, d, prefix: str, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a table, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in d if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(fields), n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ConfigError(f"{where}: unknown key {prefix}{k}{hint}; allowed keys here: "
                          f"{', '.join(prefix + n for n in fields)}")
    kwargs = {}
    for name, v in d.items():
        f, tp, key = fields[name], hints[name], prefix + name
        section = _section_type(tp)
        if section is not None:
            kwargs[name] = None if v is None else _build(section, v, key + ".", where)
            continue
        c = _coerce(tp, v)
        if c is _NO:
            raise ConfigError(f"{where}: {key} = {v!r} is not allowed; expected {_type_name(tp)}")
        if not _finite(c):  # inf/nan (TOML inf, nan, 1e309) pass every > 0 check and train to NaN
            raise ConfigError(f"{where}: {key} = {v!r} is not allowed; expected a finite number"
                              + (f" ({f.metadata.get('allowed')})" if f.metadata.get("allowed") else ""))
        check = f.metadata.get("check")
        if check is not None and c is not None and not check(c):
            raise ConfigError(f"{where}: {key} = {v!r} is not allowed; expected "
                              f"{f.metadata.get('allowed')}")
        kwargs[name] = c
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=0.1'`` -> (['train', 'lr'], 0.1). Values use TOML syntax; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.lr=0.01")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: missing key before '='")
    if raw.lower() in ("none", "null"):
        return key.split("."), None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as adam or cosine
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of the raw experiment dict with ``--set`` overrides applied (None removes a key)."""
    out = json.loads(json.dumps(raw))
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for p in path[:-1]:
            if p not in SECTIONS:
                raise ConfigError(f"--set {text!r}: unknown section {p!r}; sections: {', '.join(SECTIONS)}")
            node = node.setdefault(p, {})
        if value is None:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return out


def load_raw(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment file {str(p)!r} does not exist (or is not a file)")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file") from None


def load_experiment(path: str | Path, overrides=(), extra_tables=("sweep",)) -> ExperimentConfig:
    """Load an experiment TOML file, apply ``--set`` overrides and validate everything.

    The ``[sweep]`` table (read by ``lth sweep``) is not part of the run. A ``[quant]`` table adds
    the quantization stage (``cfg.quant``; it does not change the run id).
    """
    raw = load_raw(path)
    for t in extra_tables:
        raw.pop(t, None)
    try:
        raw = apply_overrides(raw, overrides)
    except ConfigError:
        raise
    where = f"{path}" + (" with --set " + " ".join(overrides) if overrides else "")
    return ExperimentConfig.from_dict(raw, where)


def describe_fields() -> str:
    """A plain-text listing of every setting, its default and meaning (for --help)."""
    lines = []
    for f in dataclasses.fields(ExperimentConfig):
        if f.name in SECTIONS:
            continue
        lines.append(f"  {f.name} = {_to_jsonable(f.default)!r}  {f.metadata.get('doc', '')}")
    registries = {"data.name": DATASETS, "model.name": MODELS, "prune.criterion": CRITERIA}
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            key = f"{sec}.{f.name}"
            names = f"; registered: {', '.join(registries[key].names())}" if key in registries else ""
            lines.append(f"  {key} = {_to_jsonable(f.default)!r}  {f.metadata.get('doc', '')}{names}")
    return "\n".join(lines)
