"""Fake-quantization wiring of Flax models: kernels and activations of every Dense/Conv quantized
through :func:`flax.linen.intercept_methods` (the model code is never touched), activation
statistics, per-layer outputs, and evaluation of quantized populations."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
QParams = dict  # {"scale": array, "zero_point": array}

from ..models import layer_key, layer_kind, path_names
from ..train import chunk_split, eval_program, population_program, shared_program, stack
from .numerics import QuantSpec, calibrate, fake_quant, grid_of, lsq_fake_quant, qrange, scale_zero_point

if TYPE_CHECKING:
    from .ptq import QuantizedTicket

QUANT_LAYERS = (nn.Dense, nn.Conv)

# ============================================================================ params helpers


def is_weight(path, leaf) -> bool:
    """A Dense/Conv kernel (the quantized tensors); leaves other than kernels (a transformer's position
    embedding) are not."""
    return path_names(path)[-1:] == ["kernel"] and layer_kind(path, leaf) in ("dense", "conv", "output")


def get_layer(tree: dict, key: str):
    for k in key.split("/"):
        tree = tree[k]
    return tree


def set_leaf(tree: dict, key: str, leaf: str, value) -> dict:
    """Copy of a nested dict with ``tree[key...][leaf] = value`` (no in-place mutation)."""
    parts = key.split("/") if key else []

    def go(node, i):
        node = dict(node)
        if i == len(parts):
            node[leaf] = value
        else:
            node[parts[i]] = go(node[parts[i]], i + 1)
        return node

    return go(tree, 0)


def traced_bits(spec: QuantSpec) -> tuple[QuantSpec, dict | None]:
    """``(program spec, grid)``: a multi-bit ``spec``'s weight bit width as data (:func:`lth.quant.numerics.grid_of`)
    and the spec its programs are compiled for (the same but 8 bits), so every multi-bit width runs one
    compiled program with bit-identical numbers; binary keeps ``(spec, None)`` (its own program)."""
    if spec.bits == 1:
        return spec, None
    return spec.replace(bits=8), grid_of(spec.bits, spec.scheme)


@functools.partial(jax.jit, static_argnums=1)
def weight_qparams(params: PyTree, spec: QuantSpec, grid: dict | None = None) -> dict[str, QParams]:
    """Calibrated quantizer of every kernel (from its non-zero entries); ``grid``: the weight bit width
    as data (:func:`traced_bits`), ``spec.bits`` then only says multi-bit."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if is_weight(path, leaf):
            out[layer_key(path)] = calibrate(leaf, leaf != 0, spec.bits, spec.scheme, spec.calibration,
                                             spec.granularity, spec.percentile, grid=grid)
    return out


@functools.partial(jax.jit, static_argnums=2)
def quantize_weights(params: PyTree, qparams: dict[str, QParams], spec: QuantSpec,
                     grid: dict | None = None) -> PyTree:
    """Params whose kernels are fake-quantized with ``qparams`` (STE); other leaves unchanged. ``grid``:
    as :func:`weight_qparams`'."""

    def f(path, leaf):
        if not is_weight(path, leaf):
            return leaf
        qp = qparams[layer_key(path)]
        return fake_quant(leaf, qp["scale"], qp["zero_point"], spec.bits, spec.scheme, grid)

    return jax.tree_util.tree_map_with_path(f, params)


def weight_codes(params: PyTree, qparams: dict[str, QParams], spec: QuantSpec) -> dict[str, np.ndarray]:
    """Integer codes (int32 numpy, kernel-shaped) of every kernel: :func:`lth.quant.numerics.quantize` in
    numpy on the host (the same IEEE float32 division, round-half-even and clip; no program per kernel shape)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if is_weight(path, leaf):
            scale, zero_point = expand_groups(qparams[layer_key(path)], leaf.shape)
            x = np.asarray(leaf, np.float32)
            if spec.bits == 1:
                q = np.sign(x)
            else:
                qmin, qmax = qrange(spec.bits, spec.scheme)
                q = np.clip(np.round(x / np.asarray(scale, np.float32)) + np.asarray(zero_point, np.float32),
                            qmin, qmax)
            out[layer_key(path)] = q.astype(np.int32)
    return out


def expand_groups(qp: QParams, shape) -> tuple:
    """``(scale, zero_point)`` of a kernel's quantizer, broadcastable to the kernel ``shape``: per
    channel ``[C]`` as they are; per group (GPTQ: ``[groups, C]`` with ``group_index [fan_in]``, the
    group of each input) expanded to the kernel's shape."""
    if "group_index" not in qp:
        return qp["scale"], qp["zero_point"]
    idx = np.asarray(qp["group_index"])
    grow = lambda a: np.asarray(a)[idx].reshape(shape)  # noqa: E731
    return grow(qp["scale"]), grow(qp["zero_point"])


# ============================================================================ fake-quant model

def _act_interceptor(quantize_input: Callable[[str, jax.Array], jax.Array]):
    """Interceptor rewriting the input of every Dense/Conv call as ``quantize_input(layer, x)``."""

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, QUANT_LAYERS) or not args:
            return next_fun(*args, **kwargs)
        key = "/".join(context.module.path)
        return next_fun(quantize_input(key, args[0]), *args[1:], **kwargs)

    return intercept


def _recorder(store: dict, outputs: bool = False):
    """Interceptor recording each Dense/Conv call's input (or output) by layer key, in call order."""

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, QUANT_LAYERS) or not args:
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        store["/".join(context.module.path)] = out if outputs else args[0]
        return out

    return intercept


def quant_gate(consts: dict, quantized: PyTree, x: PyTree) -> PyTree:
    """``quantized`` where the member's switch ``consts["on"]`` is 1 (or absent), ``x`` where it is 0.

    QAT and its float control (``float_ft``) run the same compiled program: a member whose switch is
    0 computes exactly the float forward pass (``where`` selects ``x`` itself) and gets exactly the float
    gradient (the cotangent of the unselected branch is zero), so both follow one schedule by
    construction."""
    on = consts.get("on")
    if on is None:
        return quantized
    return jax.tree.map(lambda q, v: jnp.where(on > 0, q, v), quantized, x)


@dataclass(frozen=True, eq=False)
class FakeQuantModel:
    """A stand-in for a Flax model whose ``apply`` runs ``base`` with quantized weights/activations.

    It has the ``apply(variables, x, train=..., mutable=...)`` signature the training engine uses,
    so :class:`lth.train.Engine` trains and evaluates it unchanged (QAT is ordinary masked training
    of this model). ``weights`` says how kernels are quantized in the forward pass:

    - ``"static"``: the params already hold quantized kernels (PTQ output); nothing is done;
    - ``"fixed"``: re-calibrated from the current weights at every call, STE gradients (QAT);
    - ``"lsq"``: learned log-scales in ``params["lsq"]["w"]`` (QAT with LSQ).

    Activations are quantized at the input of every Dense/Conv from
    ``batch_stats["quant"]["acts"]`` (or learned in ``params["lsq"]["a"]`` with ``"lsq"``) when
    ``spec.act_bits`` is set. See the module docstring for the variables layout. A switch
    ``batch_stats["quant"]["on"]`` (0 or 1, per member) turns quantization off for a member
    (:func:`quant_gate`): QAT's float control trains in the same program. With ``batch_stats["quant"]
    ["w_grid"]`` (:func:`traced_bits`; and ``["w_grad_scale"]``, LSQ's per-kernel gradient scale
    :func:`lsq_grad_scale`) the weights' bit width is data, not ``spec.bits``: one program for every
    multi-bit width (:func:`fake_quant_model` builds it so).
    """

    base: Any
    spec: QuantSpec
    weights: Literal["static", "fixed", "lsq"] = "static"
    traced: bool = False  # the weight bit width comes from batch_stats["quant"]["w_grid"]

    def net_params(self, params: dict, consts: dict) -> PyTree:
        """The base model's params as the forward pass sees them (kernels quantized)."""
        spec, net = self.spec, params["net"]
        grid = None
        if self.traced and self.weights != "static":
            if "w_grid" not in consts:
                raise ValueError(f"FakeQuantModel(weights={self.weights!r}, traced=True): batch_stats['quant'] has "
                                 "no 'w_grid' (the weight bit width as data: lth.quant.qat.qat_variables sets it)")
            grid = consts["w_grid"]
        if self.weights == "fixed":
            wq = jax.lax.stop_gradient(weight_qparams(net, spec, grid))
            return quant_gate(consts, quantize_weights(net, wq, spec, grid), net)
        if self.weights == "lsq":
            def f(path, leaf):
                if not is_weight(path, leaf):
                    return leaf
                key = layer_key(path)
                gs = lsq_grad_scale(leaf.shape, spec) if grid is None else consts["w_grad_scale"][key]
                return lsq_fake_quant(leaf, params["lsq"]["w"][key], consts["w_zero_point"][key], spec.bits,
                                      spec.scheme, gs, grid)
            return quant_gate(consts, jax.tree_util.tree_map_with_path(f, net), net)
        return net

    def _quantize_input(self, params: dict, consts: dict):
        spec = self.spec
        acts = consts.get("acts", {})

        def q(key, x):
            if key not in acts:
                return x
            qp = acts[key]
            if self.weights == "lsq":
                qmax = qrange(spec.act_bits, spec.act_scheme)[1]
                n = x.size / x.shape[0]
                return quant_gate(consts, lsq_fake_quant(x, params["lsq"]["a"][key], qp["zero_point"], spec.act_bits,
                                                         spec.act_scheme, 1.0 / math.sqrt(n * qmax)), x)
            return quant_gate(consts, fake_quant(x, jax.lax.stop_gradient(qp["scale"]),
                                                 jax.lax.stop_gradient(qp["zero_point"]), spec.act_bits,
                                                 spec.act_scheme), x)

        return q

    def apply(self, variables: dict, x, train: bool = False, mutable=False, **kw):
        params = variables["params"]
        bs = variables.get("batch_stats", {}) or {}
        consts = bs.get("quant", {})
        net_vars = {"params": self.net_params(params, consts)}
        has_bs = bool(jax.tree.leaves(bs.get("net", {})))
        if has_bs:
            net_vars["batch_stats"] = bs["net"]
        interceptor = _act_interceptor(self._quantize_input(params, consts))
        with nn.intercept_methods(interceptor):
            if mutable and has_bs:
                out, upd = self.base.apply(net_vars, x, train=train, mutable=["batch_stats"], **kw)
                return out, {"batch_stats": {**bs, "net": upd["batch_stats"]}}
            out = self.base.apply(net_vars, x, train=train, **kw)
        return (out, {"batch_stats": bs}) if mutable else out


def fake_quant_model(model, spec: QuantSpec, weights: str = "static") -> FakeQuantModel:
    """The (memoized, so compiled functions are reused) :class:`FakeQuantModel` of a base model.

    Its programs serve every setting that computes the same: a ``"static"`` model (kernels already on
    their grid) depends only on the activations' ``act_bits`` and ``act_scheme``; a ``"fixed"`` or
    ``"lsq"`` model of a multi-bit ``spec`` takes the bit width as data (:func:`traced_bits`: its
    variables carry ``w_grid``, as :func:`lth.quant.qat.qat_variables` makes them)."""
    if weights == "static":
        spec = QuantSpec(act_bits=spec.act_bits, act_scheme=spec.act_scheme)
        return cached(("fq", spec, weights), model, lambda: FakeQuantModel(model, spec, weights))
    spec, grid = traced_bits(spec)
    traced = grid is not None
    return cached(("fq", spec, weights, traced), model, lambda: FakeQuantModel(model, spec, weights, traced))


def lsq_grad_scale(shape, spec: QuantSpec) -> float:
    """LSQ's gradient scale ``1 / sqrt(N Qp)`` of a kernel of ``shape`` (N: the weights per scale)."""
    qmax = max(qrange(spec.bits, spec.scheme)[1], 1)
    n = math.prod(shape) / (shape[-1] if spec.granularity == "channel" else 1)
    return 1.0 / math.sqrt(n * qmax)


def base_variables(params, batch_stats) -> dict:
    v = {"params": params}
    if jax.tree.leaves(batch_stats):
        v["batch_stats"] = batch_stats
    return v


# ============================================================================ activation calibration

def cached(kind, model, build: Callable[[], Any]) -> Any:
    """One compiled function per (kind, model) in the process (:func:`lth.train.shared_program`); Flax
    modules compare by value, so a model rebuilt from the same config (another level, another call)
    reuses the compiled code."""
    return shared_program((kind, model), build)


def collect_inputs(model, params, batch_stats, xs: np.ndarray, batch_size: int = 256,
                   max_values: int = 1 << 18) -> dict[str, dict]:
    """Per Dense/Conv layer: exact min/max of its input over ``xs`` and a uniform subsample.

    ``model`` may be a base model or a :class:`FakeQuantModel` (with its full variables in
    ``params``/``batch_stats``). Returns ``{layer: {"min", "max", "sample": 1-D array}}``.
    """
    def build():
        def run(p, b, x):
            store: dict = {}
            with nn.intercept_methods(_recorder(store)):
                if isinstance(model, FakeQuantModel):
                    model.apply({"params": p, "batch_stats": b}, x, train=False)
                else:
                    model.apply(base_variables(p, b), x, train=False)
            return store

        return jax.jit(run)

    run = cached("inputs", model, build)
    stats: dict[str, dict] = {}
    n_batches = max(1, math.ceil(len(xs) / batch_size))
    per_batch = max(1, max_values // n_batches)
    rng = np.random.default_rng(0)
    for i in range(n_batches):
        acts = jax.device_get(run(params, batch_stats, jnp.asarray(xs[i * batch_size:(i + 1) * batch_size])))
        for k, a in acts.items():
            a = np.asarray(a, np.float32).ravel()
            s = stats.setdefault(k, {"min": np.inf, "max": -np.inf, "sample": []})
            s["min"], s["max"] = min(s["min"], float(a.min())), max(s["max"], float(a.max()))
            s["sample"].append(a if a.size <= per_batch else rng.choice(a, per_batch, replace=False))
    for s in stats.values():
        s["sample"] = np.concatenate(s["sample"])
    return stats


def input_ranges(model, params, batch_stats, xs: np.ndarray, batch_size: int = 256,
                 member_batch: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Exact min and max of every Dense/Conv input over ``xs``, per member of a population.

    ``params``/``batch_stats`` are stacked ``[K, ...]``; returns ``({layer: lo [K]}, {layer: hi [K]})``,
    the same values :func:`collect_inputs` gives member by member.
    """
    def build():
        def member(p, b, x):
            store: dict = {}
            with nn.intercept_methods(_recorder(store)):
                model.apply(base_variables(p, b), x, train=False)
            return {k: (jnp.min(a), jnp.max(a)) for k, a in store.items()}

        return jax.jit(population_program(member, (0, 0, None), member_batch))

    run = cached(("ranges", member_batch), model, build)
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    for i in range(0, max(len(xs), 1), batch_size):
        for k, (a, b) in jax.device_get(run(params, batch_stats, jnp.asarray(xs[i:i + batch_size]))).items():
            lo[k] = np.minimum(lo[k], a) if k in lo else np.asarray(a)
            hi[k] = np.maximum(hi[k], b) if k in hi else np.asarray(b)
    return lo, hi


def act_qparams(stats: dict[str, dict], spec: QuantSpec) -> dict[str, QParams]:
    """Per-tensor activation quantizers from :func:`collect_inputs` statistics."""
    method = spec.act_calibration or spec.calibration
    out = {}
    for k, s in stats.items():
        if method == "minmax":
            qp = scale_zero_point(s["min"], s["max"], spec.act_bits, spec.act_scheme)
            qp = {"scale": qp[0], "zero_point": qp[1]}
        else:
            x = jnp.asarray(s["sample"])
            qp = calibrate(x, jnp.ones_like(x, bool), spec.act_bits, spec.act_scheme, method, "tensor",
                           spec.percentile)
        out[k] = {"scale": jnp.asarray(qp["scale"], jnp.float32).reshape(()),
                  "zero_point": jnp.asarray(qp["zero_point"], jnp.float32).reshape(())}
    return out


def layer_outputs(model, variables: dict, xs: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
    """Mean output of every Dense/Conv (over all axes but the last) on ``xs``: ``{layer: [C]}``."""
    def build():
        def run(v, x):
            store: dict = {}
            with nn.intercept_methods(_recorder(store, outputs=True)):
                model.apply(v, x, train=False)
            return {k: jnp.sum(a.reshape(-1, a.shape[-1]), 0) / (a.size // a.shape[-1]) * x.shape[0]
                    for k, a in store.items()}

        return jax.jit(run)

    run = cached("outputs", model, build)
    total: dict[str, np.ndarray] = {}
    for i in range(0, len(xs), batch_size):
        for k, s in jax.device_get(run(variables, jnp.asarray(xs[i:i + batch_size]))).items():
            total[k] = total.get(k, 0) + np.asarray(s, np.float64)
    return {k: (v / len(xs)).astype(np.float32) for k, v in total.items()}


def call_order(model, variables: dict, x) -> list[str]:
    """Layer keys of the Dense/Conv calls of one forward pass, in call order (traced, not run)."""
    order: list[str] = []

    def intercept(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, QUANT_LAYERS):
            order.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    def run(v, x):
        with nn.intercept_methods(intercept):
            return model.apply(v, x, train=False)

    jax.eval_shape(run, variables, jnp.asarray(x))
    return list(dict.fromkeys(order))


# ============================================================================ evaluation

def fake_quant_predict(model, qt: QuantizedTicket, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Class predictions ``[N]`` of the fake-quantized network ``qt``."""
    fq = fake_quant_model(model, qt.spec, "static")
    apply = cached("predict", fq, lambda: jax.jit(lambda v, xb: jnp.argmax(fq.apply(v, xb), -1)))
    v = qt.variables()
    out = [np.asarray(apply(v, jnp.asarray(x[i:i + batch_size]))) for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


class Evaluator:
    """Accuracy of populations of (fake-quantized or float) networks on the val and test splits."""

    def __init__(self, data, chunk: int = 1000, member_batch: int | None = None):
        self.member_batch = member_batch
        splits = [(name, x, y) for name, x, y in (("val", data.x_val, data.y_val), ("test", data.x_test, data.y_test))
                  if len(x)]
        # every split padded to the same chunks: one compiled evaluation program per model, not one per split
        chunk = max(1, min(chunk, max(len(x) for _, x, _ in splits)))
        chunks = max(math.ceil(len(x) / chunk) for _, x, _ in splits)
        self.sets = {name: chunk_split(x, y, chunk, chunks) for name, x, y in splits}

    def _fn(self, model):
        return eval_program(model, self.member_batch)  # the engines' own, where their settings are equal

    def accuracy(self, model, params: PyTree, batch_stats: PyTree) -> dict[str, np.ndarray]:
        """split -> accuracy ``[K]`` of the stacked ``[K, ...]`` params/batch_stats."""
        return {name: acc for name, (_, acc) in self.metrics(model, params, batch_stats).items()}

    def metrics(self, model, params: PyTree, batch_stats: PyTree) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """split -> (mean loss ``[K]``, accuracy ``[K]``) of the stacked ``[K, ...]`` params/batch_stats: for
        text, the mean next-token loss over the split's fixed windows, as training's evaluation."""
        fn = self._fn(model)
        out = {}
        for name, s in self.sets.items():
            loss, acc = fn(params, batch_stats, *s)
            out[name] = (np.asarray(loss), np.asarray(acc))
        return out

    def quantized(self, model, qts: Sequence[QuantizedTicket],
                  fq: FakeQuantModel | None = None) -> dict[str, np.ndarray]:
        return {name: acc for name, (_, acc) in self.quantized_metrics(model, qts, fq).items()}

    def quantized_metrics(self, model, qts: Sequence[QuantizedTicket],
                          fq: FakeQuantModel | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """split -> (loss ``[K]``, accuracy ``[K]``) of the fake-quantized members ``qts``."""
        fq = fq or fake_quant_model(model, qts[0].spec, "static")
        v = stack([q.variables() for q in qts])
        return self.metrics(fq, v["params"], v["batch_stats"])

