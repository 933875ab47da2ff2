"""Integer inference of quantized MLP / LeNet / Conv-2/4/6 tickets.

Every Dense/Conv runs on int8 operands with int32 accumulation
(``lax.dot_general`` / ``lax.conv_general_dilated`` with ``preferred_element_type=int32``), with
the zero-point terms of Jacob et al. (2018, Eq. 7) and an int32 bias at scale ``S_x S_w``::

    acc = sum (x - Zx)(w - Zw) + round(b / (Sx Sw))
        = x.w - Zx sum w - Zw sum x + K Zx Zw + b_q

The int32 accumulator is requantized to the next layer's input quantizer,
``q = clip(round(M acc) + Z_next)`` with ``M = Sx Sw / S_next`` a float32 per-channel multiplier
(the QLinearMatMul/QLinearConv semantics of ONNX), ReLU is ``max(q, Z_next)`` and max-pooling
runs on the int8 values (both commute with the monotone quantizer, so this equals quantizing
``pool(relu(y))`` as the fake-quant model does). The output layer's accumulator is dequantized
to float logits. Unsigned codes are shifted by ``2^(b-1)`` into int8 (and their zero points with
them), so 8-bit asymmetric tensors fit int8 operands.

Grouped weights (GPTQ's ``quant.group_size``: a scale and zero point per group of inputs of each
channel, ``group_index [fan_in]`` the group of each input) have no single accumulator scale, so
each group gets its own int32 accumulator (the zero-point terms of Eq. 7 per group) and the groups
are summed in float32: ``y_c = Sx sum_g Sw_gc acc_gc + b_c`` (the bias stays float32, as the fake-quant
model keeps it); ``y`` is then quantized to the next layer's input, ``clip(round(y / S_next) + Z_next)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .numerics import qrange
from .ptq import QuantizedTicket, layer_program


@dataclass
class IntLayer:
    """One Dense/Conv layer in integers: codes, weight quantizer, float32 bias, input quantizer."""

    kind: str  # "dense" | "conv"
    q: np.ndarray  # int32 integer values, kernel-shaped ([in, out] or [kh, kw, in, out])
    bits: int
    scheme: str
    scale: np.ndarray  # float32 [C] or []
    zero_point: np.ndarray  # int32 [C] or []
    bias: np.ndarray  # float32 [C]
    act_scale: float  # input quantizer
    act_zero_point: int
    act_bits: int
    act_scheme: str
    # grouped weights (GPTQ): scale and zero_point are [groups, C], group_index [fan_in] (int32) the
    # group of each input in the kernel's row-major (kh, kw, cin) order; None: per channel/tensor
    group_index: np.ndarray | None = None


@dataclass
class IntegerModel:
    """A quantized network as integer layers and the op program that runs them."""

    program: list[dict]
    layers: dict[str, IntLayer]
    input_shape: tuple[int, ...]
    num_classes: int
    _arrays: dict | None = field(default=None, init=False, repr=False, compare=False)

    def predict(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Class predictions ``[N]`` (argmax of :meth:`logits`)."""
        return np.argmax(self.logits(x, batch_size), -1)

    def logits(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Float logits ``[N, num_classes]`` computed by the integer program."""
        fn = _compiled(self)
        out = [np.asarray(fn(_device_arrays(self), jnp.asarray(x[i:i + batch_size])))
               for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

    def accuracy(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
        return float(np.mean(self.predict(x, batch_size) == np.asarray(y)))


def from_quantized(model, qt: QuantizedTicket, input_shape, num_classes: int) -> IntegerModel:
    """The integer model of a quantized MLP/ConvNet; needs activation quantizers (``spec.act_bits``)."""
    program = layer_program(model)
    spec = qt.spec
    codes = qt.codes()
    layers = {}
    for op in program:
        if op["op"] not in ("dense", "conv"):
            continue
        name = op["layer"]
        if name not in qt.act_qparams:
            raise ValueError(f"integer inference needs activation quantizers; {name} has none (quantize with "
                             "activations, e.g. act_bits=8)")
        wq, aq = qt.weight_qparams[name], qt.act_qparams[name]
        layers[name] = IntLayer(
            kind=op["op"], q=codes[name], bits=spec.bits, scheme=spec.scheme,
            scale=np.asarray(wq["scale"], np.float32), zero_point=np.asarray(wq["zero_point"]).astype(np.int32),
            bias=np.asarray(qt.params[name]["bias"], np.float32), act_scale=float(aq["scale"]),
            act_zero_point=int(aq["zero_point"]), act_bits=spec.act_bits, act_scheme=spec.act_scheme,
            group_index=np.asarray(wq["group_index"], np.int32) if "group_index" in wq else None)
    return IntegerModel(program, layers, tuple(input_shape), int(num_classes))


def _shift(bits: int, scheme: str) -> int:
    """Offset moving unsigned codes into int8 (0 for signed and binary codes)."""
    return 2 ** (bits - 1) if scheme == "asym" and bits > 1 else 0


def _device_arrays(im: IntegerModel) -> dict:
    """Per layer: int8 operands, zero points, int32 bias and the float32 multipliers."""
    if im._arrays is not None:
        return im._arrays
    names = [op["layer"] for op in im.program if op["op"] in ("dense", "conv")]
    out = {}
    for i, name in enumerate(names):
        L = im.layers[name]
        if L.group_index is not None:
            nxt = im.layers[names[i + 1]] if i + 1 < len(names) else None
            out[name] = jax.tree.map(jnp.asarray, _grouped_arrays(L, nxt))
            continue
        c = L.q.shape[-1]
        ws, xs = _shift(L.bits, L.scheme), _shift(L.act_bits, L.act_scheme)
        w8 = (L.q - ws).astype(np.int8)
        zw = np.broadcast_to(L.zero_point - ws, (c,)).astype(np.int32)
        s_w = np.broadcast_to(L.scale, (c,)).astype(np.float32)
        s_in = np.float32(L.act_scale) * s_w  # Sx Sw per channel
        bias_q = np.clip(np.round(L.bias.astype(np.float64) / s_in.astype(np.float64)), -2 ** 31, 2 ** 31 - 1)
        d = {"w8": w8, "zw": zw, "wsum": w8.astype(np.int32).reshape(-1, c).sum(0), "bias_q": bias_q.astype(np.int32),
             "zx": np.int32(L.act_zero_point - xs), "s_in": s_in}
        if i + 1 < len(names):
            N = im.layers[names[i + 1]]
            d["m"] = (s_in / np.float32(N.act_scale)).astype(np.float32)
            d["z_next"] = np.int32(N.act_zero_point)
        out[name] = jax.tree.map(jnp.asarray, d)
    im._arrays = out
    return out


def _grouped_arrays(L: IntLayer, nxt: IntLayer | None) -> dict:
    """A grouped layer's operands: ``w8g [G, *kernel]`` (the kernel's int8 codes in group g's inputs, 0
    elsewhere), per (group, channel) zero points, code sums and float32 scales, the input -> group
    indicator ``onehot [*kernel[:-1], G]`` (int8) and the group sizes ``k [G]``."""
    ws, xs = _shift(L.bits, L.scheme), _shift(L.act_bits, L.act_scheme)
    groups, c = np.shape(L.scale)
    w8 = (L.q - ws).astype(np.int8)
    onehot = (np.asarray(L.group_index)[:, None] == np.arange(groups)[None]).reshape(*L.q.shape[:-1], groups)
    w8g = np.moveaxis(onehot, -1, 0)[..., None] * w8[None]  # [G, *kernel]
    d = {"w8g": w8g.astype(np.int8), "onehot": onehot.astype(np.int8),
         "zw": (np.asarray(L.zero_point) - ws).astype(np.int32),  # [G, C]
         "wsum": w8g.astype(np.int32).reshape(groups, -1, c).sum(1), "k": onehot.reshape(-1, groups).sum(0)
         .astype(np.int32), "zx": np.int32(L.act_zero_point - xs),
         "s_in": (np.float32(L.act_scale) * np.asarray(L.scale, np.float32)).astype(np.float32),  # Sx Sw [G, C]
         "bias": np.asarray(L.bias, np.float32)}
    if nxt is not None:
        d["s_next"], d["z_next"] = np.float32(nxt.act_scale), np.int32(nxt.act_zero_point)
    return d


def _grouped_layer(h, A, kind: str):
    """Float32 output ``[N, ..., C]`` of a grouped layer: one int32 accumulator per group (Jacob et al.
    2018, Eq. 7 within the group), summed over the groups at their scales ``Sx Sw_gc``, plus the bias."""
    w8g = A["w8g"]
    groups, c = w8g.shape[0], w8g.shape[-1]
    if kind == "dense":
        acc = jnp.einsum("ni,gic->ngc", h, w8g, preferred_element_type=jnp.int32)
        rowsum = lax.dot_general(h, A["onehot"], (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    else:
        kh, kw, cin = w8g.shape[1:4]
        pads = ((0, 0), ((kh - 1) // 2, kh - 1 - (kh - 1) // 2), ((kw - 1) // 2, kw - 1 - (kw - 1) // 2), (0, 0))
        hp = jnp.pad(h, pads, constant_values=A["zx"].astype(h.dtype))
        dn = ("NHWC", "HWIO", "NHWC")
        w = jnp.moveaxis(w8g, 0, -2).reshape(kh, kw, cin, groups * c)  # out channels (g, c)
        acc = lax.conv_general_dilated(hp, w, (1, 1), "VALID", dimension_numbers=dn, preferred_element_type=jnp.int32)
        acc = acc.reshape(*acc.shape[:-1], groups, c)
        rowsum = lax.conv_general_dilated(hp, A["onehot"], (1, 1), "VALID", dimension_numbers=dn,
                                          preferred_element_type=jnp.int32)
    acc = acc - A["zx"] * A["wsum"] - A["zw"] * rowsum[..., None] + (A["k"] * A["zx"])[:, None] * A["zw"]
    return jnp.sum(acc.astype(jnp.float32) * A["s_in"], axis=-2) + A["bias"]


@functools.lru_cache(maxsize=32)
def _compiled_for(key):
    program, meta = key
    return jax.jit(functools.partial(_forward, [dict(o) for o in program], dict(meta)))


def _compiled(im: IntegerModel):
    names = [op["layer"] for op in im.program if op["op"] in ("dense", "conv")]
    meta = tuple((n, (im.layers[n].bits, im.layers[n].scheme, im.layers[n].act_bits, im.layers[n].act_scheme,
                      im.layers[n].act_scale, im.layers[n].act_zero_point)) for n in names)
    program = tuple(tuple(sorted(o.items())) for o in im.program)
    return _compiled_for((program, meta))


def _int_dense(h, A):
    acc = lax.dot_general(h, A["w8"], (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    rowsum = jnp.sum(h.astype(jnp.int32), axis=1, keepdims=True)
    k = h.shape[1]
    return acc - A["zx"] * A["wsum"] - A["zw"] * rowsum + k * A["zx"] * A["zw"] + A["bias_q"]


def _int_conv(h, A):
    kh, kw, cin, _ = A["w8"].shape
    # SAME padding with the real zero, i.e. the input's zero point (not the integer 0)
    pads = ((0, 0), ((kh - 1) // 2, kh - 1 - (kh - 1) // 2), ((kw - 1) // 2, kw - 1 - (kw - 1) // 2), (0, 0))
    hp = jnp.pad(h, pads, constant_values=A["zx"].astype(h.dtype))
    dn = ("NHWC", "HWIO", "NHWC")
    acc = lax.conv_general_dilated(hp, A["w8"], (1, 1), "VALID", dimension_numbers=dn,
                                   preferred_element_type=jnp.int32)
    ones = jnp.ones((kh, kw, cin, 1), jnp.int8)
    rowsum = lax.conv_general_dilated(hp, ones, (1, 1), "VALID", dimension_numbers=dn,
                                      preferred_element_type=jnp.int32)
    k = kh * kw * cin
    return acc - A["zx"] * A["wsum"] - A["zw"] * rowsum + k * A["zx"] * A["zw"] + A["bias_q"]


def _forward(program, meta, arrays, x):
    names = [op["layer"] for op in program if op["op"] in ("dense", "conv")]
    bits0, scheme0, abits, ascheme, ascale, azp = meta[names[0]]
    qmin, qmax = qrange(abits, ascheme)
    q = jnp.clip(jnp.round(x / jnp.float32(ascale)) + azp, qmin, qmax)
    h = (q - _shift(abits, ascheme)).astype(jnp.int8)
    for op in program:
        kind = op["op"]
        if kind == "flatten":
            h = h.reshape(h.shape[0], -1)
        elif kind == "pool":
            h = lax.reduce_window(h, jnp.array(jnp.iinfo(jnp.int8).min, jnp.int8), lax.max, (1, 2, 2, 1),
                                  (1, 2, 2, 1), "VALID")
        elif "w8g" in arrays[op["layer"]]:  # grouped weights: float32 sum of the groups' accumulators
            A = arrays[op["layer"]]
            y = _grouped_layer(h, A, kind)
            if "s_next" not in A:  # the output layer
                return y
            i = names.index(op["layer"])
            _, _, nbits, nscheme, _, _ = meta[names[i + 1]]
            qmin, qmax = qrange(nbits, nscheme)
            q = jnp.clip(jnp.round(y / A["s_next"]) + A["z_next"], qmin, qmax)
            if op["relu"]:
                q = jnp.maximum(q, A["z_next"])
            h = (q - _shift(nbits, nscheme)).astype(jnp.int8)
        else:
            A = arrays[op["layer"]]
            acc = _int_dense(h, A) if kind == "dense" else _int_conv(h, A)
            if "m" not in A:  # the output layer: dequantize
                return acc.astype(jnp.float32) * A["s_in"]
            i = names.index(op["layer"])
            _, _, nbits, nscheme, _, _ = meta[names[i + 1]]
            qmin, qmax = qrange(nbits, nscheme)
            q = jnp.clip(jnp.round(acc.astype(jnp.float32) * A["m"]) + A["z_next"], qmin, qmax)
            if op["relu"]:
                q = jnp.maximum(q, A["z_next"])
            h = (q - _shift(nbits, nscheme)).astype(jnp.int8)
    raise ValueError("program has no output layer")
