"""Measured inference speed of a level's ticket in every format that applies (``lth speed``).

Formats (:data:`FORMATS`, a registry: name -> builder returning a :class:`Built` or None where the
format does not apply to the ticket):

- ``dense``: the masked network as dense float32 arrays through the model's own ``apply`` (jit):
  the baseline every speedup is relative to.
- ``bcoo``: every conv/dense kernel as a ``jax.experimental.sparse.BCOO`` matrix (convs as im2col
  patches times the sparse ``[kh*kw*cin, out]`` kernel), jit-compiled.
- ``csr``: every kernel as a ``scipy.sparse`` CSR matrix (same im2col for convs), numpy activations
  feature-major ``[features, batch]``; CPU only, single-threaded (scipy's sparse product).
- ``compact``: the physically smaller dense network of a neuron/filter ticket (:func:`lth.structured.compact`),
  or the smaller vit/gpt of a head/neuron ticket (:func:`lth.prune.compact_blocks.compact_blocks`).
- ``int8``: the integer program (:mod:`lth.quant.intinfer`: int8 operands, int32 accumulation) of the
  ticket's 8-bit PTQ (per-channel symmetric weights, 8-bit asymmetric activations, min-max
  calibration on train batches). Its reference is the fake-quantized float network it computes
  (predictions agree on >= 95% of the check batch; the logits differ by requantization rounding), not
  the float ticket.
- ``nm``: an N:M ticket (``prune.granularity = 'n:m'``) in the compact N:M format of :mod:`lth.nm`
  (``values [G, k, out]`` + in-group ``index``), computed by gathering each kept weight's input
  (``B * nnz`` multiply-adds, the work a sparse kernel does); kernels that are not grouped stay dense.

Every format first runs a fixed check batch (the first 64 test examples) and must equal the dense
masked network to float tolerance (``rtol = atol = 1e-4`` relative to the largest logit) or a
:class:`SpeedCheckError` names it. Then each (format, batch size) is timed on the first ``batch``
test examples: warm-up calls, then ``repeats`` timed repeats of ``number`` calls (``number`` grows
until a repeat takes ``min_time`` seconds), the formats taking turns repeat by repeat so that load
from other processes hits them alike; the row keeps the best (minimum) time per call and the median.
A format whose single call takes longer than ``max_call_s`` is timed by that call (``repeats = 1``).

Rows go to ``level_NNN/speed.parquet`` (atomic write; a rerun replaces the rows of the same member,
format and batch), one per (member, format, batch), with the machine and library versions.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax import lax

from .config import ConfigError
from .prune.masks import prunable
from .prune.nm import as_matrix, group_counts, groupable, nm_bytes, nm_compress
from .quant import QuantSpec, fake_quant_model, from_quantized, layer_program, ptq, size_report
from .store import (RunStore, StoreError, atomic_write_bytes, load_tree, parquet_bytes,
                    read_members_file)
from .stored import StoredRun
from .models import structure_of
from .prune.compact_blocks import compact_blocks, compactable
from .prune.structured import chain_norms, chain_order, compact, compact_ops, is_structured
from .train import apply_mask, unstack

CHECK_BATCH = 64
RTOL = ATOL = 1e-4
FLOAT_BYTES = 4
INDEX_BYTES = 4  # int32 indices of BCOO and scipy CSR


class SpeedCheckError(ValueError):
    """A format whose outputs differ from the dense masked network's; the message names it."""


@dataclass
class Ticket:
    """One member of a stored level, ready to be put into every format."""

    model: Any
    model_cfg: Any
    prune_cfg: Any
    params: dict  # masked float32 numpy weights
    mask: dict
    batch_stats: dict
    input_shape: tuple
    num_classes: int
    calib_x: np.ndarray | None = None  # train examples for the int8 calibration
    program: list[dict] = field(default_factory=list)

    @property
    def density(self) -> float:
        can = prunable(self.params, self.prune_cfg, structure_of(self.model))
        kept = sum(int(np.sum(m)) for m, c in zip(jax.tree.leaves(self.mask), jax.tree.leaves(can)) if c)
        total = sum(int(np.size(m)) for m, c in zip(jax.tree.leaves(self.mask), jax.tree.leaves(can)) if c)
        return kept / total if total else 1.0


@dataclass
class Built:
    """A format ready to run: ``fn(x) -> logits``, its weight bytes and what its outputs are checked against."""

    fn: Callable[[np.ndarray], Any]
    bytes: int
    reference: Callable[[np.ndarray], np.ndarray] | None = None  # None: the dense masked network
    check: str = "float"


FORMATS: dict[str, Callable[[Ticket], Built | None]] = {}


def register(name: str):
    def deco(builder):
        FORMATS[name] = builder
        return builder
    return deco


def _count(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _bias_bytes(t: Ticket) -> int:
    return FLOAT_BYTES * (_count(t.params) - sum(int(np.size(t.params[n]["kernel"])) for n in _kernels(t)))


def _kernels(t: Ticket) -> list[str]:
    return [op["layer"] for op in t.program if op["op"] in ("dense", "conv")]


# ============================================================================ dense baseline

@register("dense")
def build_dense(t: Ticket) -> Built:
    model = t.model
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    p = jax.tree.map(jnp.asarray, t.params)
    return Built(lambda x: fn(p, x), FLOAT_BYTES * _count(t.params))


# ============================================================================ sparse formats in jax

def _patches(h, kh: int, kw: int):
    """SAME-padded im2col of NHWC ``h``: ``[B*H*W, kh*kw*C]`` in the HWIO kernel's row order."""
    B, H, W, C = h.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    hp = jnp.pad(h, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
    cols = [hp[:, i:i + H, j:j + W, :] for i in range(kh) for j in range(kw)]
    return jnp.stack(cols, axis=3).reshape(B * H * W, kh * kw * C)


def _program_forward(program, shapes, matmul, weights, x):
    """The MLP/ConvNet forward pass of ``lth.quant.layer_program`` with ``matmul(w, h2d) -> [N, out]``."""
    h = x
    for op in program:
        if op["op"] == "flatten":
            h = h.reshape(h.shape[0], -1)
        elif op["op"] == "pool":
            h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        else:
            w = weights[op["layer"]]
            if op["op"] == "conv":
                kh, kw = shapes[op["layer"]][:2]
                B, H, W, _ = h.shape
                y = matmul(w["w"], _patches(h, kh, kw)).reshape(B, H, W, -1)
            else:
                y = matmul(w["w"], h)
            h = y + w["bias"]
            if op["relu"]:
                h = jnp.maximum(h, 0)
    return h


CHUNK_BYTES = 1 << 28  # intermediate of one sparse product (BCOO: nse x rows, N:M: gathered inputs)


def _row_chunks(f, h, rows: int):
    """``f(h)`` for ``h [N, K]`` computed ``rows`` rows at a time (``lax.map``): bounds the memory of
    products whose intermediate grows with N times the non-zeros (a conv's im2col patches)."""
    n = h.shape[0]
    if rows >= n:
        return f(h)
    pad = (-n) % rows
    out = lax.map(f, jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, rows, h.shape[1]))
    return out.reshape(-1, out.shape[-1])[:n]


def bcoo_matmul(w, h):
    """``h [N, K] @ W`` for a BCOO ``W^T [out, K]``, in row chunks of at most :data:`CHUNK_BYTES`."""
    return _row_chunks(lambda p: (w @ p.T).T, h, max(1, CHUNK_BYTES // (4 * max(1, w.nse))))


def _jax_format(t: Ticket, make_w, matmul) -> Callable:
    shapes = {n: tuple(np.shape(t.params[n]["kernel"])) for n in _kernels(t)}
    weights = {n: {"w": make_w(np.asarray(t.params[n]["kernel"], np.float32)),
                   "bias": jnp.asarray(t.params[n].get("bias", np.zeros(shapes[n][-1], np.float32)))}
               for n in _kernels(t)}
    fn = jax.jit(functools.partial(_program_forward, t.program, shapes, matmul))
    return lambda x: fn(weights, x)


@register("bcoo")
def build_bcoo(t: Ticket) -> Built | None:
    if not t.program:
        return None
    from jax.experimental import sparse

    def make(k):  # transposed [out, K]: sparse @ dense is jax's fastest BCOO product
        wt = as_matrix(k).T
        idx = np.argwhere(wt != 0).astype(np.int32)  # row-major order, as BCOO.fromdense (no compile)
        return sparse.BCOO((jnp.asarray(wt[wt != 0]), jnp.asarray(idx)), shape=wt.shape,
                           indices_sorted=True, unique_indices=True)

    nnz = sum(int(np.count_nonzero(t.params[n]["kernel"])) for n in _kernels(t))
    nbytes = nnz * (FLOAT_BYTES + 2 * INDEX_BYTES) + _bias_bytes(t)
    return Built(_jax_format(t, make, bcoo_matmul), nbytes)


def nm_matmul(w: dict, h, m: int):
    """``h [N, K] @ W`` for W in the compact N:M format ``{"values", "index": [G, k, out]}`` (gather form)."""
    values, index = w["values"], w["index"]
    G = values.shape[0]

    def rows(p):
        picked = p.reshape(p.shape[0], G, m)[:, jnp.arange(G)[:, None, None], index]  # [rows, G, k, out]
        return jnp.einsum("ngko,gko->no", picked, values)

    return _row_chunks(rows, h, max(1, CHUNK_BYTES // (4 * values.size)))


def _nm_layers(t: Ticket) -> dict[str, int]:
    """Kernels held as N:M (k per group of m, k < m) for ``prune.granularity = 'n:m'``."""
    pc = t.prune_cfg
    if pc.granularity != "n:m":
        return {}
    out = {}
    for name in _kernels(t):
        mk = np.asarray(t.mask[name]["kernel"])
        if groupable(mk.shape, pc.m):
            k = int(group_counts(mk, pc.m).max())
            if k < pc.m:
                out[name] = k
    return out


@register("nm")
def build_nm(t: Ticket) -> Built | None:
    layers = _nm_layers(t)
    if not t.program or not layers:
        return None
    m = t.prune_cfg.m
    shapes = {n: tuple(np.shape(t.params[n]["kernel"])) for n in _kernels(t)}
    weights, nbytes = {}, _bias_bytes(t)
    for n in _kernels(t):
        k = np.asarray(t.params[n]["kernel"], np.float32)
        if n in layers:
            v, i = nm_compress(k, layers[n], m)
            w = {"values": jnp.asarray(v), "index": jnp.asarray(i.astype(np.int32))}
            nbytes += nm_bytes(k.shape, layers[n], m, 32)
        else:
            w = jnp.asarray(as_matrix(k))
            nbytes += FLOAT_BYTES * k.size
        weights[n] = {"w": w, "bias": jnp.asarray(t.params[n].get("bias", np.zeros(shapes[n][-1], np.float32)))}

    def matmul(w, h):
        return nm_matmul(w, h, m) if isinstance(w, dict) else h @ w

    fn = jax.jit(functools.partial(_program_forward, t.program, shapes, matmul))
    return Built(lambda x: fn(weights, x), nbytes)


# ============================================================================ scipy CSR (CPU)

def _np_patches(h: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """im2col of channel-first ``h [C, B, H, W]``: ``[kh*kw*C, B*H*W]`` in the HWIO kernel's row order."""
    C, B, H, W = h.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    hp = np.pad(h, ((0, 0), (0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw)))
    return np.stack([hp[:, :, i:i + H, j:j + W] for i in range(kh) for j in range(kw)]).reshape(kh * kw * C, -1)


@register("csr")
def build_csr(t: Ticket) -> Built | None:
    if not t.program or jax.default_backend() != "cpu":
        return None
    import scipy.sparse as sp

    layers, nbytes = {}, _bias_bytes(t)
    for n in _kernels(t):
        k = np.asarray(t.params[n]["kernel"], np.float32)
        w = sp.csr_matrix(np.ascontiguousarray(as_matrix(k).T))  # [out, K]
        b = np.asarray(t.params[n].get("bias", np.zeros(k.shape[-1])), np.float32)
        layers[n] = (w, b[:, None], k.shape)
        nbytes += w.data.nbytes + w.indices.nbytes + w.indptr.nbytes
    program = t.program

    def fn(x):
        x = np.asarray(x, np.float32)
        B = x.shape[0]
        h = x.transpose(3, 0, 1, 2) if x.ndim == 4 else x.reshape(B, -1).T  # [C, B, H, W] or [F, B]
        for op in program:
            if op["op"] == "flatten":
                if h.ndim == 4:  # NHWC flatten order (h, w, c) per example
                    h = np.ascontiguousarray(h.transpose(2, 3, 0, 1)).reshape(-1, B)
            elif op["op"] == "pool":
                C, _, H, W = h.shape
                h = h[:, :, :H // 2 * 2, :W // 2 * 2].reshape(C, B, H // 2, 2, W // 2, 2).max((3, 5))
            else:
                w, b, shape = layers[op["layer"]]
                if op["op"] == "conv":
                    _, _, H, W = h.shape
                    h = (w @ _np_patches(h, shape[0], shape[1])).reshape(-1, B, H, W) + b[:, :, None, None]
                else:
                    h = w @ np.ascontiguousarray(h) + b
                if op["relu"]:
                    np.maximum(h, 0, out=h)
        return h.T

    return Built(fn, nbytes)


# ============================================================================ compact and int8

@register("compact")
def build_compact(t: Ticket) -> Built | None:
    st = structure_of(t.model)
    if st.chain is None and compactable(t.model):  # a vit or gpt: fewer heads and MLP hidden units
        if t.prune_cfg.granularity not in ("head", "neuron"):
            return None
        small, small_params, _ = compact_blocks(t.params, t.mask, t.model)
        fn = jax.jit(lambda p, x: small.apply({"params": p}, x))
        p = jax.tree.map(jnp.asarray, small_params)
        return Built(lambda x: fn(p, x), FLOAT_BYTES * _count(small_params))
    if t.prune_cfg.granularity not in ("neuron", "filter"):
        return None
    try:
        compact_ops(st, t.params)  # the model's chain is one compact rebuilds
    except ValueError:
        return None
    if not is_structured(t.mask, chain_order(st, t.params), chain_norms(st)):
        return None
    small, small_params = compact(t.params, t.mask, t.model_cfg, t.num_classes, t.input_shape, t.model)
    fn = jax.jit(lambda p, x: small.apply({"params": p}, x))
    p = jax.tree.map(jnp.asarray, small_params)
    return Built(lambda x: fn(p, x), FLOAT_BYTES * _count(small_params))


@register("int8")
def build_int8(t: Ticket) -> Built | None:
    if not t.program or t.calib_x is None:
        return None
    spec = QuantSpec(8, "sym", "channel", "minmax", act_bits=8, act_scheme="asym")
    qt = ptq(t.model, t.params, t.batch_stats, spec, t.calib_x)
    im = from_quantized(t.model, qt, t.input_shape, t.num_classes)
    fq = fake_quant_model(t.model, spec, "static")
    fq_fn = jax.jit(lambda v, x: fq.apply(v, x))
    variables = qt.variables()
    return Built(lambda x: im.logits(np.asarray(x), batch_size=max(1, len(x))),
                 int(size_report(qt)["int8_dense_bytes"]),
                 reference=lambda x: np.asarray(fq_fn(variables, x)), check="fake-quant")


# ============================================================================ checking and timing

def check_outputs(name: str, built: Built, dense: Built, x: np.ndarray) -> float:
    """Max |format - reference| on ``x``; SpeedCheckError if the format is not the same network."""
    out = np.asarray(built.fn(x), np.float32)
    ref = np.asarray((built.reference or dense.fn)(x), np.float32)
    if out.shape != ref.shape:
        raise SpeedCheckError(f"format {name}: output shape {out.shape}, the dense masked network's {ref.shape}")
    diff = float(np.max(np.abs(out - ref))) if out.size else 0.0
    if built.check == "fake-quant":  # requantization rounding may flip a near tie: compare predictions
        agree = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
        if agree < 0.95:
            raise SpeedCheckError(f"format {name}: predictions agree with the fake-quant network on only "
                                  f"{100 * agree:.1f}% of {len(x)} examples")
        return diff
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    if not np.allclose(out, ref, rtol=RTOL, atol=ATOL * scale):
        raise SpeedCheckError(f"format {name}: outputs differ from the dense masked network's by up to {diff:.3g} "
                              f"(tolerance {ATOL * scale:.3g})")
    return diff


def _block(y):
    return jax.block_until_ready(y) if isinstance(y, jax.Array) else y


def _calls(fn, x, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        _block(fn(x))
    return (time.perf_counter() - t0) / number


def _calibrate(fn, x, min_time: float, max_call_s: float, warmup: int) -> tuple[int, float]:
    """(calls per repeat, seconds of the first call after the warm-up): calls double until a repeat
    lasts ``min_time``; 0 calls when one call takes longer than ``max_call_s``."""
    for _ in range(max(1, warmup)):  # the first call of a new input shape compiles
        t0 = time.perf_counter()
        _block(fn(x))
        if time.perf_counter() - t0 > 2 * max_call_s:  # compiled and still slow: no more warm-up
            break
    t0 = time.perf_counter()
    _block(fn(x))
    first = time.perf_counter() - t0
    if first > max_call_s:
        return 0, first
    number = 1
    while _calls(fn, x, number) * number < min_time and number < 1 << 14:
        number *= 2
    return number, first


def time_calls(fns: dict[str, Callable], x, repeats: int = 7, min_time: float = 0.02, max_call_s: float = 2.0,
               warmup: int = 2) -> dict[str, dict]:
    """Best and median seconds per call of each ``fns[name](x)``, timed round-robin: repeat r of every
    function runs before repeat r + 1 of any, so load from other processes hits them alike.

    ``warmup`` calls (at least one: it compiles) precede the timing; a function whose next call takes
    longer than ``max_call_s`` is timed by that call alone.
    """
    plan = {name: _calibrate(fn, x, min_time, max_call_s, warmup) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] if plan[name][0] else [plan[name][1]] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if plan[name][0]:
                times[name].append(_calls(fn, x, plan[name][0]))
    return {name: {"latency_s": float(min(ts)), "median_s": float(np.median(ts)), "repeats": len(ts),
                   "number": max(1, plan[name][0])} for name, ts in times.items()}


def time_call(fn: Callable, x, **kw) -> dict:
    """:func:`time_calls` of one function."""
    return time_calls({"f": fn}, x, **kw)["f"]


def machine_info() -> dict:
    """Device, CPU and library versions (recorded in every row)."""
    import scipy

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()[0]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)), "cpu": cpu,
            "cpu_cores": int(cores or 0), "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": getattr(__import__("jaxlib"), "__version__", ""), "numpy": np.__version__,
            "scipy": scipy.__version__}


def _inputs(x: np.ndarray, batch: int) -> np.ndarray:
    reps = -(-batch // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:batch] if reps > 1 else x[:batch])


def measure_ticket(t: Ticket, x: np.ndarray, batches: Sequence[int], formats: Sequence[str] | None = None,
                   **timing) -> list[dict]:
    """Rows (format, batch, latency_s, median_s, throughput, bytes, speedup, max_abs_diff, ...) of one ticket.

    ``x``: test examples (the check batch and the timed inputs are taken from it). ``formats``: names
    from :data:`FORMATS` (default all; those that do not apply are skipped). ``timing``: :func:`time_calls`
    keywords (the formats of one batch size are timed round-robin).
    """
    wanted = list(FORMATS) if formats is None else list(formats)
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        raise ConfigError(f"--formats {','.join(unknown)}: unknown format; formats: {', '.join(FORMATS)}")
    if "dense" not in wanted:
        wanted.insert(0, "dense")
    dense = build_dense(t)
    xc = np.asarray(x[:CHECK_BATCH])
    built, diffs = {}, {}
    for name in wanted:
        b = dense if name == "dense" else FORMATS[name](t)
        if b is not None:
            diffs[name] = check_outputs(name, b, dense, xc)
            built[name] = b
    rows = []
    for b in batches:
        measured = time_calls({name: f.fn for name, f in built.items()}, _inputs(x, b), **timing)
        for name, r in measured.items():
            rows.append({"format": name, "batch": int(b), **r, "throughput": b / r["latency_s"],
                         "bytes": int(built[name].bytes), "max_abs_diff": diffs[name], "check": built[name].check})
    base = {r["batch"]: r["latency_s"] for r in rows if r["format"] == "dense"}
    for r in rows:
        r["speedup"] = base[r["batch"]] / r["latency_s"]
    return rows


# ============================================================================ stored runs

def open_ticket(run_dir: str | Path, level: int, member: int = 0, calib_examples: int = 512):
    """(Ticket, test inputs, run info) of member ``member`` of a stored level."""
    run_dir = Path(run_dir)
    if not (run_dir / "hparams.json").is_file():
        raise StoreError(f"{run_dir} is not a run folder (no hparams.json); pass OUT/<run_id>")
    run = StoredRun.open(run_dir)
    run.check_level(level)
    cfg, store, data, model = run.cfg, run.store, run.data, run.model
    d = store.level_dir(level)
    members = read_members_file(d / "members.json")
    if not 0 <= member < len(members):
        raise ConfigError(f"--member {member}: level {level} of {run_dir} has members 0..{len(members) - 1}")
    who = members[member]
    if not (isinstance(who, dict) and isinstance(who.get("arm"), str) and isinstance(who.get("seed"), int)):
        raise StoreError(f"{d / 'members.json'}: member {member} has no arm and seed ({who!r}); the file is damaged")
    final = load_tree(d / "final.msgpack")
    mask = jax.tree.map(lambda a: np.asarray(a, bool), unstack(load_tree(d / "masks.msgpack"), member))
    params = jax.tree.map(lambda a: np.asarray(a, np.float32),
                          apply_mask(unstack(final["params"], member), mask))
    bs = unstack(final.get("batch_stats", {}) or {}, member)
    try:
        program = layer_program(model)
    except ValueError:
        program = []  # no batch-norm/residual support: only the dense baseline
    calib = np.asarray(data.x_train[:calib_examples]) if program else None
    t = Ticket(model, cfg.model, cfg.prune, params, mask, bs, tuple(data.input_shape), data.num_classes,
               calib, program)
    info = {"run_id": run_dir.name, "experiment": cfg.name, "model": cfg.model.name, "level": level,
            "member": member, "arm": members[member]["arm"], "seed": int(members[member]["seed"]),
            "granularity": cfg.prune.granularity}
    return t, np.asarray(data.x_test), info, store


def _stored_speed(path: Path) -> pd.DataFrame | None:
    """The rows of a level's ``speed.parquet``; None when there is none, or when it is unreadable (a
    truncated file: said on stderr, and replaced by the rows measured now)."""
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types on a damaged file
        print(f"lth: {path} is unreadable ({type(e).__name__}); replacing it with the rows measured now",
              file=sys.stderr)
        return None


def measure_run(run_dir: str | Path, levels: Sequence[int] | None = None, batches: Sequence[int] = (1, 256),
                formats: Sequence[str] | None = None, member: int = 0, log: Callable[[str], None] | None = None,
                **timing) -> pd.DataFrame:
    """Measure every level (default: every complete one) of a run; write ``level_NNN/speed.parquet``.

    Returns the tidy rows of this call: run_id, experiment, model, level, member, arm, seed,
    granularity, density, format, batch, latency_s, median_s, throughput (examples/s), bytes,
    speedup (dense latency / latency, same level and batch), max_abs_diff, check, repeats, number,
    and the machine and library versions (:func:`machine_info`).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "hparams.json").is_file():
        raise StoreError(f"{run_dir} is not a run folder (no hparams.json); pass OUT/<run_id>")
    unknown = [f for f in formats or () if f not in FORMATS]
    if unknown:
        raise ConfigError(f"--formats {','.join(unknown)}: unknown format; formats: {', '.join(FORMATS)}")
    store = RunStore(run_dir.parent, run_dir.name)
    with store.lock():  # the stages' lock: nothing is read or written under a grow (RunBusyError: busy)
        return _measure_levels(run_dir, store, levels, batches, formats, member, log, timing)


def _measure_levels(run_dir: Path, store: RunStore, levels, batches, formats, member, log, timing) -> pd.DataFrame:
    """:func:`measure_run` under the run's lock (which finished any swap a killed grow left)."""
    complete = [int(p.name[6:]) for p in sorted(run_dir.glob("level_[0-9][0-9][0-9]")) if store.is_complete(int(p.name[6:]))]
    levels = complete if levels is None else list(levels)
    missing = [lv for lv in levels if lv not in complete]
    if missing:
        raise StoreError(f"{run_dir}: level(s) {', '.join(map(str, missing))} not complete; complete levels: "
                         f"{', '.join(map(str, complete)) or 'none'}")
    machine = machine_info()
    frames = []
    for level in levels:
        t, x, info, store = open_ticket(run_dir, level, member)
        rows = measure_ticket(t, x, batches, formats, **timing)
        df = pd.DataFrame([{**info, "density": t.density, **r, **machine} for r in rows])
        path = store.level_dir(level) / "speed.parquet"
        old = _stored_speed(path)
        if old is not None:
            keep = ~(old["member"].isin(df["member"]) & old["format"].isin(df["format"])
                     & old["batch"].isin(df["batch"]))
            df_all = pd.concat([old[keep], df], ignore_index=True)
        else:
            df_all = df
        atomic_write_bytes(path, parquet_bytes(df_all))
        frames.append(df)
        if log:
            log(f"level {level}: density {100 * t.density:.3g}%, formats {', '.join(df['format'].unique())}")
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
