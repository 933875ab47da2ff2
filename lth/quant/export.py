"""Size accounting and the compressed export file of a quantized ticket.

A kernel of ``n`` entries with ``nnz`` non-zero integer codes at ``b`` bits is stored in the
smallest of three encodings (the zero of channel c is its zero point ``Z_c``):

- ``dense``: every code, ``ceil(n b / 8)`` bytes (not for binary kernels with zeros);
- ``bitmask``: one bit per entry (non-zero or not) + the non-zero codes:
  ``ceil(n / 8) + ceil(nnz b / 8)`` bytes;
- ``relative``: Deep Compression's relative index (Han et al. 2016, Sec. 3): for each non-zero
  the number of zeros since the previous one in ``r`` bits (``r`` = 1..8, the best one); a run of
  ``2^r - 1`` zeros or more emits escape fields of ``2^r - 1`` (a skip with no value) first:
  ``ceil(E r / 8) + ceil(nnz b / 8)`` bytes with ``E = nnz + sum_gaps floor(gap / (2^r - 1))``;
- ``nm`` (only when asked for with ``nm=(n, m)``, for tickets of ``prune.granularity = 'n:m'``): the
  compact N:M format of :mod:`lth.nm`, exactly ``n`` codes per group of ``m`` consecutive input
  weights of one output (zero-point padded) and each code's in-group position in
  ``ceil(log2 m)`` bits: ``ceil(V b / 8) + ceil(V ceil(log2 m) / 8)`` bytes with ``V = fan_in / m * n * out``
  (2:4 at 8 bits: 0.625 bytes per weight, as NVIDIA's 2-bit metadata). Always used for the N:M
  kernels of an N:M ticket (the layout 2:4 sparse tensor cores read), even where ``bitmask`` would be
  a few bytes smaller because some kept weights quantize to zero (their slots are padded).

Codes are packed little-endian, ``b`` bits each, with no padding between values. A layer also
stores its float32 scales (4 bytes each), its zero points (1 byte each, asym only): one per
channel, or with GPTQ's ``quant.group_size`` one per group of inputs of each channel (plus, under
act-order, each input's group in ``ceil(log2 groups)`` bits: :func:`group_index_bytes`), its float32
bias, and its input's activation scale (4 bytes) and zero point (1 byte, asym only).
``size_bytes`` is the sum of these payloads (the header with shapes and names is not counted, as
in Deep Compression); ``compression = fp32_dense_bytes / size_bytes`` where ``fp32_dense_bytes`` is
4 bytes per parameter of the dense float network.

The export file (no pickle)::

    b"LTHQEXP1" | uint32 little-endian header length | header (UTF-8 JSON) | payload | sha256

The header lists every array (dtype, shape, offset, nbytes into the payload), the layer program,
quantizer settings, data set and provenance, and the payload's sha256. The last 32 bytes are the
sha256 of everything before them, so the header that says how to decode the payload is covered
too (format version 2; version 1 files had no such trailer and are refused). Written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .intinfer import IntegerModel, IntLayer
from .numerics import qrange
from .ptq import QuantizedTicket
from .wiring import expand_groups, is_weight
from ..config import ExperimentConfig
from .. import registry
from ..data import load_dataset
from ..store import StoreError, atomic_write_bytes
from ..prune.nm import groupable, index_bits

MAGIC = b"LTHQEXP1"
VERSION = 2  # 2: a sha256 of the whole file (header included) ends it
DIGEST_BYTES = 32
ENCODINGS = ("dense", "bitmask", "relative")
NM = "nm"  # the N:M encoding, a candidate only for kernels of N:M tickets (nm=(n, m))
SCALE_BYTES = 4  # float32
ZERO_POINT_BYTES = 1  # uint8
BIAS_BYTES = 4  # float32


class ExportError(StoreError):
    """An export file that cannot be read; the message names the path and what is wrong."""


# ============================================================================ bit packing

def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``values`` (each < 2^bits) packed little-endian, ``bits`` each: ``ceil(n bits / 8)`` bytes."""
    v = np.asarray(values, np.uint32).ravel()
    if v.size and int(v.max()) >= 1 << bits:
        raise ValueError(f"value {int(v.max())} does not fit in {bits} bits")
    bitmat = ((v[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bitmat.ravel(), bitorder="little")


def unpack_bits(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` unsigned values (int64)."""
    flat = np.unpackbits(np.asarray(buf, np.uint8), count=count * bits, bitorder="little")
    return (flat.reshape(count, bits).astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(1)


# ============================================================================ codes

def to_codes(q: np.ndarray, bits: int, scheme: str) -> np.ndarray:
    """Unsigned b-bit storage codes of integer values ``q`` (binary: -1 -> 0, +1 -> 1; 0 is not a code)."""
    q = np.asarray(q, np.int64)
    if bits == 1:
        return (q > 0).astype(np.int64)
    return q - qrange(bits, scheme)[0]


def from_codes(codes: np.ndarray, bits: int, scheme: str) -> np.ndarray:
    codes = np.asarray(codes, np.int64)
    if bits == 1:
        return np.where(codes > 0, 1, -1)
    return codes + qrange(bits, scheme)[0]


def _zero_q(q: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """Per-entry integer value of real zero (the channel's zero point), broadcast to ``q``."""
    return np.broadcast_to(np.asarray(zero_point, np.int64), q.shape)


def _gaps(nonzero: np.ndarray) -> np.ndarray:
    """Zeros before each non-zero since the previous one (flat order)."""
    idx = np.flatnonzero(nonzero)
    return np.diff(np.concatenate([[-1], idx])) - 1


def _relative_fields(gaps: np.ndarray, r: int) -> int:
    """Index fields E of the relative encoding with r-bit gaps (escapes included)."""
    return int(gaps.size + np.sum(gaps // ((1 << r) - 1)))


def encoded_sizes(q: np.ndarray, zero_point: np.ndarray, bits: int) -> dict[str, int]:
    """Payload bytes of a kernel's codes in each encoding (``relative`` with its best r).

    Also returns ``relative_bits`` (the best r) and ``nnz``.
    """
    q = np.asarray(q)
    n = q.size
    nz = (q != _zero_q(q, zero_point)).ravel()
    nnz = int(nz.sum())
    values = math.ceil(nnz * bits / 8)
    gaps = _gaps(nz)
    rel = {r: math.ceil(_relative_fields(gaps, r) * r / 8) + values for r in range(1, 9)}
    r_best = min(rel, key=rel.get)
    out = {"bitmask": math.ceil(n / 8) + values, "relative": rel[r_best], "relative_bits": r_best, "nnz": nnz}
    if not (bits == 1 and nnz < n):
        out["dense"] = math.ceil(n * bits / 8)
    return out


def _nm_groups(q: np.ndarray, zero_point: np.ndarray, m: int):
    """(codes ``[G, m, out]``, non-zero ``[G, m, out]``) of a kernel viewed as ``[fan_in, out]``."""
    out = q.shape[-1]
    g = q.reshape(-1, m, out)
    return g, g != _zero_q(q, zero_point).reshape(g.shape)


def nm_encoded_bytes(q: np.ndarray, zero_point: np.ndarray, bits: int, n: int, m: int) -> int | None:
    """Bytes of a kernel in the ``nm`` encoding, or None when it is not N:M (a group holds more than n)."""
    q = np.asarray(q)
    if bits == 1 or not groupable(q.shape, m):  # binary codes cannot pad a group with a zero
        return None
    _, nz = _nm_groups(q, zero_point, m)
    if nz.sum(1).max(initial=0) > n:
        return None
    v = nz.shape[0] * n * nz.shape[2]
    return math.ceil(v * bits / 8) + math.ceil(v * index_bits(m) / 8)


def nm_of(prune_cfg) -> tuple[int, int] | None:
    """``(n, m)`` of a run whose ``prune.granularity`` is ``'n:m'`` (its kernels may use the nm encoding), else None."""
    return (prune_cfg.n, prune_cfg.m) if prune_cfg.granularity == "n:m" else None


def _best_encoding(sizes: dict, nm_size: int | None) -> tuple[str, int]:
    """The ``nm`` encoding for an N:M kernel of an N:M ticket, else the smallest of :data:`ENCODINGS`."""
    if nm_size is not None:
        return NM, nm_size
    return min(((e, sizes[e]) for e in ENCODINGS if e in sizes), key=lambda c: c[1])


def encode_kernel(q: np.ndarray, zero_point: np.ndarray, bits: int, scheme: str,
                  encoding: str | None = None, nm: tuple[int, int] | None = None
                  ) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays (uint8) and metadata of a kernel's integer values ``q`` in the smallest encoding
    (with ``nm=(n, m)``: the N:M encoding wherever the kernel is N:M)."""
    q = np.asarray(q, np.int64)
    sizes = encoded_sizes(q, zero_point, bits)
    nm_size = nm_encoded_bytes(q, zero_point, bits, *nm) if nm is not None else None
    if encoding is None:
        encoding = _best_encoding(sizes, nm_size)[0]
    if encoding == NM:
        if nm_size is None:
            raise ValueError(f"encoding 'nm' cannot store this kernel: it is not {nm[0]}:{nm[1]}" if nm else
                             "encoding 'nm' needs nm=(n, m)")
        n, m = nm
        g, nz = _nm_groups(q, zero_point, m)
        order = np.argsort(~nz, axis=1, kind="stable")[:, :n, :]  # non-zeros first, then zero-point pads
        values = np.take_along_axis(g, order, axis=1)
        arrays = {"values": pack_bits(to_codes(values.ravel(), bits, scheme), bits),
                  "index": pack_bits(order.ravel(), index_bits(m))}
        meta = {"encoding": NM, "shape": list(q.shape), "bits": bits, "scheme": scheme, "nnz": int(nz.sum()),
                "n": n, "m": m}
        return arrays, meta
    if encoding not in sizes:
        raise ValueError(f"encoding {encoding!r} cannot store this kernel (binary kernels with zeros need a "
                         "sparse encoding)")
    flat = q.ravel()
    nz = flat != _zero_q(q, zero_point).ravel()
    meta = {"encoding": encoding, "shape": list(q.shape), "bits": bits, "scheme": scheme, "nnz": int(nz.sum())}
    if encoding == "dense":
        arrays = {"values": pack_bits(to_codes(flat, bits, scheme), bits)}
    else:
        arrays = {"values": pack_bits(to_codes(flat[nz], bits, scheme), bits)}
        if encoding == "bitmask":
            arrays["index"] = np.packbits(nz.astype(np.uint8), bitorder="little")
        else:
            r = sizes["relative_bits"]
            esc = (1 << r) - 1
            fields = []
            for g in _gaps(nz):
                fields.extend([esc] * int(g // esc))
                fields.append(int(g % esc))
            arrays["index"] = pack_bits(np.asarray(fields, np.int64), r)
            meta.update(index_bits=r, fields=len(fields))
    return arrays, meta


def decode_kernel(arrays: dict[str, np.ndarray], meta: dict, zero_point: np.ndarray) -> np.ndarray:
    """Integer values (int32, kernel-shaped) from :func:`encode_kernel`'s output."""
    shape, bits, scheme = tuple(meta["shape"]), int(meta["bits"]), meta["scheme"]
    n, nnz = int(np.prod(shape, dtype=np.int64)), int(meta["nnz"])
    if meta["encoding"] == "dense":
        return from_codes(unpack_bits(arrays["values"], bits, n), bits, scheme).reshape(shape).astype(np.int32)
    if meta["encoding"] == NM:
        n, m = int(meta["n"]), int(meta["m"])
        out = shape[-1]
        G = int(np.prod(shape[:-1], dtype=np.int64)) // m
        v = G * n * out
        values = from_codes(unpack_bits(arrays["values"], bits, v), bits, scheme).reshape(G, n, out)
        index = unpack_bits(arrays["index"], index_bits(m), v).reshape(G, n, out)
        dense = _zero_q(np.zeros(shape, np.int64), zero_point).copy().reshape(G, m, out)
        np.put_along_axis(dense, index, values, axis=1)
        return dense.reshape(shape).astype(np.int32)
    values = from_codes(unpack_bits(arrays["values"], bits, nnz), bits, scheme)
    if meta["encoding"] == "bitmask":
        nz = np.unpackbits(np.asarray(arrays["index"], np.uint8), count=n, bitorder="little").astype(bool)
        idx = np.flatnonzero(nz)
    elif meta["encoding"] == "relative":
        r = int(meta["index_bits"])
        esc = (1 << r) - 1
        fields = unpack_bits(arrays["index"], r, int(meta["fields"]))
        idx, pos = np.empty(nnz, np.int64), -1
        j = 0
        for f in fields:
            if f == esc:
                pos += esc
            else:
                pos += int(f) + 1
                idx[j] = pos
                j += 1
        if j != nnz:
            raise ValueError(f"relative index holds {j} entries, expected {nnz}")
    else:
        raise ValueError(f"unknown encoding {meta['encoding']!r}")
    out = _zero_q(np.zeros(shape, np.int64), zero_point).copy().ravel()
    out[idx] = values
    return out.reshape(shape).astype(np.int32)


# ============================================================================ network sizes

def _count(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def group_index_bytes(qp: dict) -> int:
    """Bytes of a grouped quantizer's input -> group map: none when the groups are consecutive runs of
    inputs (implied by the group size), else ``ceil(log2 groups)`` bits per input (GPTQ's act-order)."""
    if "group_index" not in qp:
        return 0
    idx = np.asarray(qp["group_index"]).ravel()
    if idx.size == 0 or np.all(np.diff(idx) >= 0):
        return 0
    groups = int(np.shape(qp["scale"])[0])
    return math.ceil(idx.size * max(1, math.ceil(math.log2(groups))) / 8)


def size_report(qt: QuantizedTicket, nm: tuple[int, int] | None = None) -> dict[str, Any]:
    """Bytes of one network stored as fp32 dense, fp16 dense, int8 dense and sparse + b-bit.

    ``size_bytes`` is the sparse + b-bit payload (best encoding per kernel, plus scales, zero
    points, float32 biases and other params, activation quantizers); ``compression`` is
    ``fp32_dense_bytes / size_bytes``. ``layers`` has the per-kernel detail. ``nm=(n, m)`` (an N:M
    ticket) stores every N:M kernel in the ``nm`` encoding.
    """
    spec = qt.spec
    codes = qt.codes()
    n_all = _count(qt.params) + _count(qt.batch_stats)
    n_kernels = sum(int(np.size(c)) for c in codes.values())
    other = (n_all - n_kernels) * BIAS_BYTES  # biases, batch norm: float32
    zp_bytes = ZERO_POINT_BYTES if spec.scheme == "asym" and spec.bits > 1 else 0
    act_zp = ZERO_POINT_BYTES if spec.act_scheme == "asym" else 0
    acts = len(qt.act_qparams) * (SCALE_BYTES + act_zp)
    sparse, int8, layers = 0, 0, {}
    for key, q in codes.items():
        qp = qt.weight_qparams[key]
        n_scales = int(np.size(qp["scale"]))  # per group (GPTQ): [groups, C]
        side = n_scales * (SCALE_BYTES + zp_bytes) + group_index_bytes(qp)
        _, zero_point = expand_groups(qp, q.shape)
        sizes = encoded_sizes(q, np.asarray(zero_point), spec.bits)
        nm_size = nm_encoded_bytes(q, np.asarray(zero_point), spec.bits, *nm) if nm else None
        best, nbytes = _best_encoding(sizes, nm_size)
        sparse += nbytes + side
        int8 += q.size + side
        layers[key] = {"n": int(q.size), "nnz": sizes["nnz"], "encoding": best, "bytes": nbytes + side}
    fp32 = n_all * 4
    size = sparse + other + acts
    return {"fp32_dense_bytes": fp32, "fp16_dense_bytes": n_all * 2, "int8_dense_bytes": int8 + other + acts,
            "size_bytes": size, "compression": fp32 / size, "layers": layers}


def float_size_report(params, batch_stats) -> dict[str, Any]:
    """Bytes of one float32 network stored sparse: per kernel the smaller of dense fp32 and a bitmask
    plus its non-zero fp32 values; other parameters fp32. The 32-bit point of the size axis."""
    size = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(leaf)
        if is_weight(path, a):
            size += min(a.size * 4, math.ceil(a.size / 8) + int(np.count_nonzero(a)) * 4)
        else:
            size += a.size * 4
    size += _count(batch_stats) * 4
    return {"size_bytes": int(size), "fp32_dense_bytes": (_count(params) + _count(batch_stats)) * 4}


# ============================================================================ export file

def integer_arrays(im: IntegerModel, nm: tuple[int, int] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The payload arrays and per-layer metadata of an integer model (``nm``: see :func:`encode_kernel`)."""
    arrays: dict[str, np.ndarray] = {}
    layers: dict[str, dict] = {}
    for name, L in im.layers.items():
        grouped = L.group_index is not None
        zero = expand_groups({"scale": L.scale, "zero_point": L.zero_point, "group_index": L.group_index},
                             L.q.shape)[1] if grouped else L.zero_point
        enc, meta = encode_kernel(L.q, zero, L.bits, L.scheme, nm=nm)
        for k, a in enc.items():
            arrays[f"{name}/{k}"] = a
        arrays[f"{name}/scale"] = np.asarray(L.scale, np.float32).reshape(-1)
        if L.scheme == "asym" and L.bits > 1:
            arrays[f"{name}/zero_point"] = np.asarray(L.zero_point, np.uint8).reshape(-1)
        if grouped:  # GPTQ's groups: scales [groups, C] and, under act-order, each input's group
            meta.update(_group_meta(L.group_index, int(np.shape(L.scale)[0])))
            if "group_index_bits" in meta:
                arrays[f"{name}/group_index"] = pack_bits(np.asarray(L.group_index, np.int64),
                                                          meta["group_index_bits"])
        arrays[f"{name}/bias"] = np.asarray(L.bias, np.float32)
        arrays[f"{name}/act_scale"] = np.asarray([L.act_scale], np.float32)
        if L.act_scheme == "asym":
            arrays[f"{name}/act_zero_point"] = np.asarray([L.act_zero_point], np.uint8)
        meta.update(kind=L.kind, per_channel=bool(np.ndim(L.scale) > 0), act_bits=L.act_bits,
                    act_scheme=L.act_scheme)
        layers[name] = meta
    return arrays, layers


def _group_meta(group_index: np.ndarray, groups: int) -> dict:
    """Header fields of a grouped quantizer: ``groups`` and either ``group_size`` (the groups are runs of
    ``group_size`` consecutive inputs: nothing stored) or ``group_index_bits`` (act-order: each input's
    group packed in ``ceil(log2 groups)`` bits, as :func:`group_index_bytes` counts)."""
    idx = np.asarray(group_index).ravel()
    size = max(1, int(np.sum(idx == 0)))  # the first group is a full one
    if np.array_equal(idx, np.arange(idx.size) // size):
        return {"groups": groups, "group_size": size}
    return {"groups": groups, "group_index_bits": max(1, math.ceil(math.log2(groups)))}


def _group_index(arrays: dict, name: str, meta: dict) -> np.ndarray | None:
    """``group_index [fan_in]`` of a layer of an export file (None: not grouped)."""
    if "groups" not in meta:
        return None
    fan_in = int(np.prod(meta["shape"][:-1], dtype=np.int64))
    if "group_size" in meta:
        return (np.arange(fan_in) // int(meta["group_size"])).astype(np.int32)
    idx = unpack_bits(arrays[f"{name}/group_index"], int(meta["group_index_bits"]), fan_in).astype(np.int32)
    if idx.size and (idx.min() < 0 or idx.max() >= int(meta["groups"])):
        raise ValueError(f"layer {name}: group index out of range [0, {meta['groups']})")
    return idx


def export_bytes(im: IntegerModel, info: dict | None = None, nm: tuple[int, int] | None = None) -> bytes:
    """The export file's bytes: magic, header length, JSON header, payload."""
    arrays, layers = integer_arrays(im, nm)
    table, chunks, offset = {}, [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        table[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset, "nbytes": int(a.nbytes)}
        chunks.append(a.tobytes())
        offset += a.nbytes
    payload = b"".join(chunks)
    header = {"format": "lth-quantized-ticket", "version": VERSION, "program": im.program,
              "input_shape": list(im.input_shape), "num_classes": im.num_classes, "layers": layers,
              "arrays": table, "payload_bytes": len(payload),
              "payload_sha256": hashlib.sha256(payload).hexdigest(), "info": info or {}}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = MAGIC + struct.pack("<I", len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


def write_export(path: str | Path, im: IntegerModel, info: dict | None = None,
                 nm: tuple[int, int] | None = None) -> int:
    """Write the export file atomically; returns its size in bytes."""
    data = export_bytes(im, info, nm)
    atomic_write_bytes(path, data)
    return len(data)


def read_export(path: str | Path) -> tuple[IntegerModel, dict]:
    """(integer model, header) of an export file; :class:`ExportError` naming the problem otherwise."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except OSError as e:
        raise ExportError(f"{path}: cannot read ({e.strerror})") from None
    if blob[:len(MAGIC)] != MAGIC:
        raise ExportError(f"{path}: not an lth export file (bad magic {blob[:8]!r})")
    try:
        (hlen,) = struct.unpack("<I", blob[8:12])
        header = json.loads(blob[12:12 + hlen].decode())
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise ExportError(f"{path}: unreadable header (not a JSON object)")
    if header.get("version") == 1:
        raise ExportError(f"{path}: export format version 1, whose header is not covered by a checksum; "
                          "export it again with `lth export`")
    if header.get("version") != VERSION:
        raise ExportError(f"{path}: export format version {header.get('version')!r}; this lth reads {VERSION}")
    if len(blob) < 12 + hlen + DIGEST_BYTES or hashlib.sha256(blob[:-DIGEST_BYTES]).digest() != blob[-DIGEST_BYTES:]:
        raise ExportError(f"{path}: file does not match its checksum (truncated or corrupted)")
    try:
        return _decode_export(blob[12 + hlen:-DIGEST_BYTES], header)
    except KeyError as e:
        raise ExportError(f"{path}: the header has no {e.args[0]!r} entry; the file was not written by "
                          "lth export") from None
    except (TypeError, ValueError, IndexError, AttributeError) as e:
        raise ExportError(f"{path}: the header does not describe a valid model ({type(e).__name__}: {e})") from None


def _decode_export(payload: bytes, header: dict) -> tuple[IntegerModel, dict]:
    """The integer model of a verified export file's payload and header (KeyError: a missing entry)."""
    if len(payload) != header["payload_bytes"]:
        raise ValueError(f"payload is {len(payload)} bytes, the header says {header['payload_bytes']}")
    arrays = {name: np.frombuffer(payload, np.dtype(t["dtype"]), int(np.prod(t["shape"], dtype=np.int64)),
                                  t["offset"]).reshape(t["shape"])
              for name, t in header["arrays"].items()}
    layers = {}
    for name, meta in header["layers"].items():
        asym = meta["scheme"] == "asym" and meta["bits"] > 1
        c = meta["shape"][-1]
        scale = arrays[f"{name}/scale"].astype(np.float32)
        zp = arrays[f"{name}/zero_point"].astype(np.int32) if asym else np.zeros(scale.shape, np.int32)
        if not meta["per_channel"]:
            scale, zp = scale.reshape(()), zp.reshape(())
        enc = {k: arrays[f"{name}/{k}"] for k in ("values", "index") if f"{name}/{k}" in arrays}
        group_index = _group_index(arrays, name, meta)
        if group_index is None:
            q = decode_kernel(enc, meta, zp if meta["per_channel"] else np.full(c, zp))
        else:
            scale, zp = scale.reshape(int(meta["groups"]), c), zp.reshape(int(meta["groups"]), c)
            zero = expand_groups({"scale": scale, "zero_point": zp, "group_index": group_index}, meta["shape"])[1]
            q = decode_kernel(enc, meta, zero)
        act_zp = int(arrays[f"{name}/act_zero_point"][0]) if meta["act_scheme"] == "asym" else 0
        layers[name] = IntLayer(kind=meta["kind"], q=q, bits=int(meta["bits"]), scheme=meta["scheme"], scale=scale,
                                zero_point=zp, bias=arrays[f"{name}/bias"].astype(np.float32),
                                act_scale=float(arrays[f"{name}/act_scale"][0]), act_zero_point=act_zp,
                                act_bits=int(meta["act_bits"]), act_scheme=meta["act_scheme"],
                                group_index=group_index)
    im = IntegerModel(program=header["program"], layers=layers, input_shape=tuple(header["input_shape"]),
                      num_classes=int(header["num_classes"]))
    return im, header


def payload_bytes(im: IntegerModel, nm: tuple[int, int] | None = None) -> int:
    """Bytes of the export payload (every array) of an integer model."""
    return int(sum(a.nbytes for a in integer_arrays(im, nm)[0].values()))


def eval_export(path: str | Path, split: str = "test", data: str | None = None) -> dict[str, Any]:
    """Reload an export file, run its integer model on the data set it names, report accuracy.

    ``data``: the data set to evaluate on instead of the header's name (a registered name, an entry
    point or an import path, given by the user). The header's own name is used only when it is one of
    lth's built-in data sets: reading a file never imports or calls code named inside it.
    """
    im, header = read_export(path)
    info = header.get("info", {})
    if not isinstance(info, dict) or not isinstance(info.get("data"), dict):
        if data is None:
            raise ExportError(f"{path}: the header names no data set to evaluate on; pass --data NAME")
        info = {**(info if isinstance(info, dict) else {}), "data": {}}
    raw = dict(info["data"])
    if data is not None:
        raw["name"] = data
    else:
        try:
            registry.DATASETS.check_from_file(raw.get("name", "mnist1d"), "data.name", f"{path} (header)", "--data")
        except registry.RegistryError as e:
            raise ExportError(str(e)) from None
    data = load_dataset(ExperimentConfig.from_dict({"data": raw}, str(path)).data)
    if tuple(data.input_shape) != tuple(im.input_shape):
        raise ExportError(f"{path}: model input shape {im.input_shape} does not match data set "
                          f"{data.name} {data.input_shape}")
    x, y = (data.x_test, data.y_test) if split == "test" else (data.x_val, data.y_val)
    nms = {(int(v["n"]), int(v["m"])) for v in header["layers"].values() if v.get("encoding") == NM}
    size = payload_bytes(im, nms.pop() if nms else None)
    return {"path": str(path), "split": split, "n": int(len(y)), "accuracy": im.accuracy(x, y),
            "file_bytes": Path(path).stat().st_size, "size_bytes": size,
            "compression": info.get("fp32_dense_bytes", float("nan")) / size,
            **{k: info.get(k) for k in ("run_id", "level", "member", "method", "bits", "scheme", "granularity",
                                        "calibration", "act_bits", "model")}}
