"""Data sets: a registry of loaders, a held-out validation split and train-split normalization.

Every loader returns raw arrays ``(x_train, y_train, x_test, y_test)``: images as ``uint8``
``[N, H, W, C]``, other inputs as ``float32``, labels as integers. :func:`load_dataset` holds out a
validation split from train, optionally keeps a seeded subset of the rest (``data.train_size``), scales
images to [0, 1], standardizes with the train split's statistics (per channel for images, e.g.
CIFAR-10's RGB; one scalar for flat inputs) and caches the result in-process.

Training-batch augmentation (``data.augment``, :data:`AUGMENTATIONS`) is a pure function of a PRNG
key and a batch that :mod:`lth.train` applies on the device inside the compiled step; the arrays
here are never augmented.

Files are looked up under ``$LTH_DATA_DIR`` (default ``~/.cache/lth/data``); generated data
(mnist1d) is cached under ``$LTH_CACHE_DIR`` (default ``~/.cache/lth``). A missing or damaged
file raises :class:`DataError` naming every path tried and how to get the data.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import random
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import registry
from .config import DataConfig

RawData = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Loader = Callable[[DataConfig], RawData]


class DataError(Exception):
    """A data set that is missing or damaged; the message names the paths and how to get it."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train/val/test arrays of one data set.

    ``x_*`` are float32 ``[N, H, W, C]`` for image sets and ``[N, D]`` otherwise; ``y_*`` are int32
    ``[N]``. ``x_val``/``y_val`` have 0 rows when ``val_size`` is 0. Arrays are read-only because
    one instance is shared by every caller through the in-process cache. ``augment`` names the
    training-batch augmentation (:data:`AUGMENTATIONS`) an engine applies; it changes no array.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    augment: str = "none"

    @functools.cached_property
    def fingerprint(self) -> dict:
        """Sizes of the splits and a sha256 (first 16 hex digits) of every array as loaded: what
        identifies the data a run was trained on (recorded in ``hparams.json``). Computed once per
        instance; instances are cached per config and data root."""
        h = hashlib.sha256()
        for a in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).data)
        return {"train": len(self.x_train), "val": len(self.x_val), "test": len(self.x_test),
                "sha256": h.hexdigest()[:16]}

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(28, 28, 1)`` or ``(40,)``."""
        return tuple(self.x_train.shape[1:])

    def with_augment(self, augment: str) -> "Dataset":
        """The same arrays (shared, and the same fingerprint) with training augmentation ``augment``.

        Raises DataError for an unknown augmentation or one that needs images ``[N, H, W, C]``
        when this data set's inputs are not.
        """
        if augment == self.augment:
            return self
        if augment not in AUGMENTATIONS:
            raise DataError(f"unknown data.augment {augment!r}; available: {', '.join(AUGMENTATIONS)}")
        if augment != "none" and self.x_train.ndim != 4:
            raise DataError(f"data.augment = {augment!r} needs image data [N, H, W, C]; data set {self.name!r} "
                            f"gives inputs of shape {self.input_shape}; use data.augment = 'none'")
        out = dataclasses.replace(self, augment=augment)
        out.__dict__["fingerprint"] = self.fingerprint  # the arrays are the same: hash them once
        return out

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.x_train)}, val={len(self.x_val)}, "
                f"test={len(self.x_test)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes}, augment={self.augment!r})")


# ---------------------------------------------------------------------------- registry

DATASETS: dict[str, Loader] = registry.DATASETS.entries  # the built-in and registered loaders by name
DEFAULT_VAL_SIZE: dict[str, int] = {}
NUM_CLASSES: dict[str, int] = {}
TEXT_DATA: set[str] = set()  # registered with text=True
# Most classes a data set may have (the output layer's width): beyond any classification benchmark
# (ImageNet-21k has 21,841) and a byte or word vocabulary; a stray huge label would otherwise build
# a model that exhausts memory.
MAX_CLASSES = 2**20


def register(name: str, *, val_size: int = 5000, num_classes: int = 10, text: bool = False) -> Callable[[Loader], Loader]:
    """Decorator adding ``loader(cfg) -> (x_train, y_train, x_test, y_test)`` to :data:`DATASETS`.

    ``val_size`` is the default validation hold-out when ``DataConfig.val_size`` is None. ``text``: a
    byte-level corpus for next-token prediction (a :class:`TokenStream`), judged by bits per byte.
    """
    def deco(fn: Loader) -> Loader:
        registry.DATASETS.register(name, fn)
        DEFAULT_VAL_SIZE[name] = val_size
        NUM_CLASSES[name] = num_classes
        if text:
            TEXT_DATA.add(name)
        return fn
    return deco


def is_text_data(name: str) -> bool:
    """Whether the data set ``name`` is a text corpus (a language model's data), known before any data is
    read: registered with ``text=True``, or a loader of your own with the attribute ``text = True``."""
    if name in TEXT_DATA:
        return True
    try:
        return bool(getattr(registry.DATASETS.resolve(name), "text", False))
    except Exception:  # not resolvable here (hashing a stored run whose module is gone): as registered
        return False


# ---------------------------------------------------------------------------- augmentation

CROP_PAD = 4  # pixels of zero padding around an image before crop_flip's random crop


def crop_flip(key: jax.Array, x: jax.Array, pad: int = CROP_PAD) -> jax.Array:
    """Random crop and horizontal flip of a batch of images ``x [B, H, W, C]`` -> ``[B, H, W, C]``.

    Each image is zero-padded by ``pad`` pixels on every side and an ``H x W`` window is taken at a
    random offset in ``[0, 2 pad]`` per axis (a shifted copy; the pixels shifted in are 0, the train
    mean after standardization), then flipped left-right with probability 1/2. One draw per example
    from ``key``; pure and jit/vmap-friendly.
    """
    b, h, w, c = x.shape
    k_crop, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crops = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    return jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)


# data.augment -> (key, x [B, ...]) -> x, or None for no augmentation
AUGMENTATIONS: dict[str, Callable[[jax.Array, jax.Array], jax.Array] | None] = {
    "none": None,
    "crop_flip": crop_flip,
}


def augment_key(data_key: jax.Array, step) -> jax.Array:
    """The augmentation key of one training step: ``fold_in(data_key, step)``, where ``data_key`` is
    ``jax.random.key(data seed)`` of the member; ``step`` is the global step (traced or not)."""
    return jax.random.fold_in(data_key, step)


# ---------------------------------------------------------------------------- locations

def data_dir() -> Path:
    """Root of downloaded data sets: ``$LTH_DATA_DIR`` or ``~/.cache/lth/data``."""
    return Path(os.environ.get("LTH_DATA_DIR") or "~/.cache/lth/data").expanduser()


def cache_dir() -> Path:
    """Root of generated caches: ``$LTH_CACHE_DIR`` or ``~/.cache/lth``."""
    return Path(os.environ.get("LTH_CACHE_DIR") or "~/.cache/lth").expanduser()


# ---------------------------------------------------------------------------- load + split

def load_dataset(cfg: DataConfig) -> Dataset:
    """Load ``cfg.name``, hold out ``val_size`` train examples, keep ``train_size`` of the rest and
    normalize; cached in-process. The result carries ``cfg.augment`` (:meth:`Dataset.with_augment`:
    the arrays are shared between augmentations, not loaded twice).

    The cache key includes the data and cache roots, so changing ``$LTH_DATA_DIR`` reloads.
    Call ``load_dataset.cache_clear()`` to drop cached data sets.
    """
    base = _load_cached(dataclasses.replace(cfg, augment="none"), data_dir(), cache_dir())
    return base.with_augment(cfg.augment)


@functools.lru_cache(maxsize=4)
def _load_cached(cfg: DataConfig, _data_root: Path, _cache_root: Path) -> Dataset:
    try:
        loader = registry.DATASETS.resolve(cfg.name)
    except registry.RegistryError as e:
        raise DataError(str(e)) from None
    try:
        arrays = registry.DATASETS.call(cfg.name, loader, cfg, passthrough=(DataError,))
    except registry.RegistryError as e:
        raise DataError(str(e)) from None
    if isinstance(arrays, TokenStream):  # a text corpus: split by position, windows (TextDataset)
        return _text_dataset(cfg, arrays)
    x_train, y_train, x_test, y_test = _checked(cfg.name, arrays)
    _check_loader_attrs(cfg.name, loader)
    n = len(x_train)
    default_val = DEFAULT_VAL_SIZE.get(cfg.name, getattr(loader, "val_size", None))
    if default_val is None:  # a user loader without a val_size attribute
        default_val = min(5000, n // 10)
    val_size = default_val if cfg.val_size is None else cfg.val_size
    if not 0 <= val_size < n:
        raise DataError(f"{cfg.name}: val_size = {val_size} must be in [0, {n}), the number of "
                        f"train examples; lower data.val_size")
    if len(x_test) == 0:
        raise DataError(f"{cfg.name}: the test split is empty; the data set's test files hold no examples")
    if cfg.train_size > n - val_size:
        raise DataError(f"{cfg.name}: train_size = {cfg.train_size} is larger than the train split ({n - val_size} "
                        f"examples: {n} minus val_size = {val_size}); lower data.train_size (0 = all)")
    perm = np.random.default_rng(cfg.split_seed).permutation(n)
    # the train subset is the next train_size examples of the same permutation: the val split does
    # not depend on train_size, and a subset never overlaps it
    stop = val_size + cfg.train_size if cfg.train_size else n
    val_idx, train_idx = np.sort(perm[:val_size]), np.sort(perm[val_size:stop])
    xs = [_to_float(x) for x in (x_train[train_idx], x_train[val_idx], x_test)]
    if cfg.normalize:
        # per channel for images [N, H, W, C], one scalar for flat inputs
        axes = tuple(range(xs[0].ndim - 1)) if xs[0].ndim == 4 else None
        mean, std = _mean_std(xs[0], axes)
        for x in xs:
            x -= mean
            x /= std
    ys = [np.asarray(y, np.int32) for y in (y_train[train_idx], y_train[val_idx], y_test)]
    if val_size > 0 and len(ys[1]) == 0:
        raise DataError(f"{cfg.name}: the val split is empty although data.val_size = {val_size}")
    for a in (*xs, *ys):
        a.setflags(write=False)
    num_classes = NUM_CLASSES.get(cfg.name, getattr(loader, "num_classes", None))
    top = int(max(y_train.max(initial=0), y_test.max(initial=0)))
    if num_classes is None:  # a user loader without a num_classes attribute: the largest label + 1
        if top >= MAX_CLASSES:
            raise DataError(f"data set loader {cfg.name!r}: the largest label is {top}, so the model would get "
                            f"{top + 1} outputs; lth allows at most {MAX_CLASSES} classes (labels 0..{MAX_CLASSES - 1}): "
                            "number the classes 0, 1, ...")
        num_classes = top + 1
    elif top >= int(num_classes):
        raise DataError(f"data set {cfg.name!r}: a label is {top}, but the data set has num_classes = {num_classes} "
                        f"(labels 0..{int(num_classes) - 1}); fix the labels or the loader's num_classes")
    return Dataset(cfg.name, xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], int(num_classes))


def _check_loader_attrs(name: str, loader) -> None:
    """DataError naming the loader when its optional ``num_classes`` / ``val_size`` attribute is not an
    integer (``num_classes`` >= 1, ``val_size`` >= 0)."""
    for attr, low in (("num_classes", 1), ("val_size", 0)):
        v = getattr(loader, attr, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low):
            raise DataError(f"data set loader {name!r}: its {attr} attribute is {v!r}; expected an integer >= {low} "
                            "(or no attribute)")


def _checked(name: str, arrays) -> RawData:
    """The four arrays a loader returned, as numpy; DataError naming what is wrong otherwise."""
    if not isinstance(arrays, (tuple, list)) or len(arrays) != 4:
        raise DataError(f"data set loader {name!r} must return (x_train, y_train, x_test, y_test); got "
                        f"{type(arrays).__name__}")
    try:
        x_tr, y_tr, x_te, y_te = (np.asarray(a) for a in arrays)
    except (TypeError, ValueError) as e:  # ragged lists, objects numpy cannot hold
        raise DataError(f"data set loader {name!r}: returned arrays numpy cannot read ({_first_line(e)})") from None
    if min(x_tr.ndim, x_te.ndim) < 2 or y_tr.ndim != 1 or y_te.ndim != 1:
        raise DataError(f"data set loader {name!r}: expected inputs [N, ...] and labels [N]; got x_train "
                        f"{x_tr.shape}, y_train {y_tr.shape}, x_test {x_te.shape}, y_test {y_te.shape}")
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te) or x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"data set loader {name!r}: shapes do not fit: x_train {x_tr.shape}, y_train {y_tr.shape}, "
                        f"x_test {x_te.shape}, y_test {y_te.shape}")
    if not (np.issubdtype(y_tr.dtype, np.integer) and np.issubdtype(y_te.dtype, np.integer)):
        raise DataError(f"data set loader {name!r}: labels must be integers, got {y_tr.dtype} and {y_te.dtype}")
    if (y_tr.size and y_tr.min() < 0) or (y_te.size and y_te.min() < 0):
        raise DataError(f"data set loader {name!r}: labels must be >= 0")
    return x_tr, y_tr, x_te, y_te


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


load_dataset.cache_clear = _load_cached.cache_clear  # type: ignore[attr-defined]


def _to_float(x: np.ndarray) -> np.ndarray:
    """A fresh float32 copy; uint8 images are scaled to [0, 1]."""
    if x.dtype == np.uint8:
        return np.divide(x, np.float32(255), dtype=np.float32)
    return np.array(x, dtype=np.float32)


def _mean_std(x: np.ndarray, axes: tuple[int, ...] | None, chunk: int = 4096):
    """Mean and std over ``axes`` (None: all), accumulated in float64 over row chunks."""
    total = np.zeros(() if axes is None else x.shape[-1], np.float64)
    count = x.size if axes is None else x.size // x.shape[-1]
    for i in range(0, len(x), chunk):
        total += x[i:i + chunk].sum(axis=axes, dtype=np.float64)
    mean = total / count
    sq = np.zeros_like(total)
    for i in range(0, len(x), chunk):
        sq += np.square(x[i:i + chunk] - mean, dtype=np.float64).sum(axis=axes)
    std = np.sqrt(sq / count)
    std = np.where(std > 0, std, 1.0)  # a constant input stays constant instead of becoming nan
    return mean.astype(np.float32), std.astype(np.float32)


# ---------------------------------------------------------------------------- mnist1d

@register("mnist1d", val_size=500)
def mnist1d(cfg: DataConfig) -> RawData:
    """MNIST-1D generated by the ``mnist1d`` package (seed 42, 80/20 split), cached as .npz."""
    path = cache_dir() / f"mnist1d-{cfg.mnist1d_samples}-seed42.npz"
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = tuple(f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        x_tr, y_tr, x_te, y_te = arrays
        if x_tr.ndim == x_te.ndim == 2 and len(x_tr) == len(y_tr) and len(x_te) == len(y_te):
            return arrays  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - missing or corrupt cache (zip, npy or io errors): regenerate
        pass
    arrays = _generate_mnist1d(cfg.mnist1d_samples)
    try:
        _atomic_savez(path, dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays)))
    except OSError as e:
        warnings.warn(f"could not cache mnist1d at {path}: {e}; it will be regenerated next time")
    return arrays


def _generate_mnist1d(num_samples: int) -> RawData:
    import mnist1d.data

    args = mnist1d.data.get_dataset_args()
    args.num_samples = num_samples
    # make_dataset reseeds the global random and numpy RNGs; put them back afterwards
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = mnist1d.data.make_dataset(args)  # never get_dataset: that one downloads
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return (np.asarray(d["x"], np.float32), np.asarray(d["y"], np.int32),
            np.asarray(d["x_test"], np.float32), np.asarray(d["y_test"], np.int32))


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------- IDX (MNIST family)

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or raw) into a uint8 array of its shape.

    Raises :class:`DataError` naming the file for a bad magic number, an unsupported element type,
    a truncated header or a payload whose length does not match the dimensions exactly.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
        if blob[:2] == b"\x1f\x8b":  # gzip magic; IDX files start with two zero bytes
            blob = gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is damaged or truncated, "
                        f"delete it and get it again") from None
    if len(blob) < 4 or blob[:2] != b"\x00\x00":
        raise DataError(f"{path}: bad magic number {blob[:4].hex() or '(empty file)'}; not an IDX file")
    dtype_code, ndim = blob[2], blob[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: IDX element type 0x{dtype_code:02x} is not supported (only 0x08, "
                        f"unsigned byte)")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions; the file is damaged")
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"{path}: truncated IDX header ({len(blob)} bytes for {ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(blob, ">u4", ndim, 4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(blob) - header != expected:
        raise DataError(f"{path}: payload is {len(blob) - header} bytes but dimensions {dims} need "
                        f"{expected}; the file is truncated or damaged, delete it and get it again")
    return np.frombuffer(blob, np.uint8, expected, header).reshape(dims)


def _find_files(dirs: list[Path], names: tuple[str, ...], suffixes: tuple[str, ...]
                ) -> tuple[list[Path] | None, list[str]]:
    """The first dir holding every name (with any of ``suffixes``), else None and a report per dir."""
    report = []
    for d in dirs:
        if not d.is_dir():
            report.append(f"  {d}  (folder does not exist)")
            continue
        found, missing = [], []
        for n in names:
            hit = next((d / (n + s) for s in suffixes if (d / (n + s)).is_file()), None)
            (found if hit else missing).append(hit or n)
        if not missing:
            for r in report:  # an earlier folder with some of the files: say it was passed over
                if "(missing:" in r:
                    print(f"lth: warning: {r.strip()} is incomplete; using the files in {d}", file=sys.stderr)
            return found, report
        report.append(f"  {d}  (missing: {', '.join(missing)})")
    return None, report


def _load_idx_set(name: str, dirs: list[Path], how_to_get: str) -> RawData:
    files, report = _find_files(dirs, IDX_FILES, ("", ".gz"))
    if files is None:
        raise DataError(f"{name}: data set not found. Looked for {', '.join(f + '[.gz]' for f in IDX_FILES)} "
                        f"in:\n" + "\n".join(report) + f"\nTo get it: {how_to_get}")
    x_train, y_train, x_test, y_test = (read_idx(f) for f in files)
    for (x, fx), (y, fy) in (((x_train, files[0]), (y_train, files[1])),
                             ((x_test, files[2]), (y_test, files[3]))):
        if x.ndim != 3:
            raise DataError(f"{fx}: expected images [N, H, W], got shape {x.shape}")
        if y.ndim != 1:
            raise DataError(f"{fy}: expected labels [N], got shape {y.shape}")
        if len(x) != len(y):
            raise DataError(f"{fx} holds {len(x)} images but {fy} holds {len(y)} labels")
        if len(y) and y.max() > 9:
            raise DataError(f"{fy}: label {int(y.max())} is outside [0, 9]")
    return x_train[..., None], y_train, x_test[..., None], y_test


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


@register("fashion_mnist")
def fashion_mnist(cfg: DataConfig) -> RawData:
    """Fashion-MNIST IDX files from ``$LTH_DATA_DIR/fashion_mnist`` or Debian's package."""
    dirs = [data_dir() / "fashion_mnist", DEBIAN_FASHION_MNIST]
    return _load_idx_set("fashion_mnist", dirs,
                         "apt-get install dataset-fashion-mnist, or put the four IDX files in "
                         f"{dirs[0]} (set LTH_DATA_DIR to use another data root)")


@register("mnist")
def mnist(cfg: DataConfig) -> RawData:
    """MNIST IDX files from ``$LTH_DATA_DIR/mnist``."""
    dirs = [data_dir() / "mnist"]
    return _load_idx_set("mnist", dirs,
                         f"run `lth data download mnist` (needs the internet), or put the four IDX "
                         f"files in {dirs[0]} (set LTH_DATA_DIR to use another data root)")


# ---------------------------------------------------------------------------- CIFAR-10 (binary)

CIFAR_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch -> (uint8 images [N, 32, 32, 3], uint8 labels [N])."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not blob or len(blob) % CIFAR_RECORD_BYTES:
        raise DataError(f"{path}: size {len(blob)} bytes is not a positive multiple of the "
                        f"{CIFAR_RECORD_BYTES}-byte record; the file is truncated or damaged, "
                        f"delete it and get it again")
    rec = np.frombuffer(blob, np.uint8).reshape(-1, CIFAR_RECORD_BYTES)
    labels = rec[:, 0]
    if labels.max() > 9:
        raise DataError(f"{path}: label {int(labels.max())} is outside [0, 9]; not a CIFAR-10 batch")
    images = rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # stored CHW
    return np.ascontiguousarray(images), labels


@register("cifar10")
def cifar10(cfg: DataConfig) -> RawData:
    """CIFAR-10 binary batches from ``$LTH_DATA_DIR/cifar10`` (or its ``cifar-10-batches-bin/``)."""
    root = data_dir() / "cifar10"
    files, report = _find_files([root, root / "cifar-10-batches-bin"], CIFAR_FILES, ("",))
    if files is None:
        raise DataError("cifar10: data set not found. Looked for " + ", ".join(CIFAR_FILES) + " in:\n"
                        + "\n".join(report) + "\nTo get it: run `lth data download cifar10` (needs "
                        f"the internet), or put the binary-version batches in {root} (set "
                        "LTH_DATA_DIR to use another data root)")
    batches = [read_cifar_batch(f) for f in files]
    x_train = np.concatenate([b[0] for b in batches[:5]])
    y_train = np.concatenate([b[1] for b in batches[:5]])
    return x_train, y_train, batches[5][0], batches[5][1]


# ---------------------------------------------------------------------------- text (bytes as tokens)

VOCAB_BYTES = 256  # a byte-level vocabulary: every byte value is a token
TEXT_SPLIT = (0.8, 0.1, 0.1)  # train/val/test fractions of the bytes, by position (contiguous)
PYSTDLIB_BYTES = 2 * 2**20  # the pystdlib corpus: the first 2 MiB of the concatenated files


@dataclass(frozen=True)
class TokenStream:
    """What a text loader returns instead of four arrays: the corpus as one uint8 byte stream ``[L]``,
    and what identifies it beyond its bytes (``info``: e.g. the Python version, the number of files),
    recorded in the data set's fingerprint."""

    tokens: np.ndarray
    info: dict = dataclasses.field(default_factory=dict)
    # where the corpus has an official split (e.g. WikiText-2's three files): the byte offsets (end of
    # train, end of val); None splits by position by TEXT_SPLIT
    bounds: tuple[int, int] | None = None


@dataclass(frozen=True, eq=False, repr=False)
class TextDataset(Dataset):
    """A byte-level language-modelling data set: bytes are tokens, split by position.

    ``train_tokens [L]`` (uint8) is the train part of the stream; an example is the window starting at
    byte i: ``x = train_tokens[i:i+T]``, ``y = train_tokens[i+1:i+T+1]`` (T = ``context``), and
    ``x_train``/``y_train`` ``[L - T, T]`` are zero-copy views of every such window, so a batch index
    is a window start (the engine gathers windows from the resident stream, :mod:`lth.train`). Val and
    test are the fixed non-overlapping windows (starts 0, T, 2T, ...) of their parts: ``x [N, T]``
    float32 byte values, ``y [N, T]`` int32 next bytes.
    """

    train_tokens: np.ndarray = None  # type: ignore[assignment]
    context: int = 0
    info: tuple = ()  # sorted (key, value) pairs of TokenStream.info

    @functools.cached_property
    def fingerprint(self) -> dict:
        """Split sizes (windows), bytes and a sha256 (16 hex digits) of the train stream, the val and
        test windows and the context, plus the loader's info (e.g. the Python version)."""
        h = hashlib.sha256()
        h.update(f"context={self.context}".encode())
        for a in (self.train_tokens, self.x_val, self.y_val, self.x_test, self.y_test):
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).data)
        return {"train": len(self.x_train), "val": len(self.x_val), "test": len(self.x_test),
                "train_bytes": len(self.train_tokens), "sha256": h.hexdigest()[:16], **dict(self.info)}


def split_by_position(n: int, fractions=TEXT_SPLIT) -> tuple[slice, slice, slice]:
    """Contiguous train/val/test slices of ``n`` bytes in that order, covering ``[0, n)`` with no overlap."""
    a = int(n * fractions[0])
    b = a + int(n * fractions[1])
    return slice(0, a), slice(a, b), slice(b, n)


def fixed_windows(tokens: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """The non-overlapping windows of a stream: ``x [N, T]`` float32 and ``y [N, T]`` int32 (the next bytes),
    starts 0, T, 2T, ... while the window and its next byte fit."""
    n = max(0, (len(tokens) - 1) // context)
    x = tokens[:n * context].reshape(n, context)
    y = tokens[1:n * context + 1].reshape(n, context)
    return x.astype(np.float32), y.astype(np.int32)


def _text_dataset(cfg: DataConfig, stream: TokenStream) -> TextDataset:
    tokens = np.asarray(stream.tokens)
    if tokens.ndim != 1 or tokens.dtype != np.uint8:
        raise DataError(f"text data set {cfg.name!r}: the loader's TokenStream.tokens must be uint8 bytes [L], "
                        f"got {tokens.dtype} {tokens.shape}")
    if cfg.val_size not in (None, 0):
        raise DataError(f"data.val_size = {cfg.val_size} does not apply to the text data set {cfg.name!r}: it "
                        "splits by position (80% train, 10% val, 10% test); use none (default) or 0 (no val split)")
    if cfg.train_size:
        raise DataError(f"data.train_size = {cfg.train_size} does not apply to the text data set {cfg.name!r}; "
                        "use 0 (the whole train part)")
    T = cfg.context
    fractions = TEXT_SPLIT if cfg.val_size is None else (0.8, 0.0, 0.2)
    tr, va, te = split_by_position(len(tokens), fractions)
    if stream.bounds is not None:  # the corpus' own split (data.val_size = 0: its val bytes are left out)
        a, b = stream.bounds
        tr, va, te = slice(0, a), slice(a, b if cfg.val_size is None else a), slice(b, len(tokens))
    train = np.array(tokens[tr])  # an own copy: the views below must not outlive a caller's buffer
    if len(train) < T + 1 or len(tokens[te]) < T + 1 or (va.stop > va.start and len(tokens[va]) < T + 1):
        raise DataError(f"text data set {cfg.name!r}: {len(tokens)} bytes are too few for data.context = {T}: "
                        f"the test part ({len(tokens[te])} bytes) and every other part need at least context + 1; "
                        "lower data.context or use a larger corpus")
    x_train = np.lib.stride_tricks.sliding_window_view(train[:-1], T)
    y_train = np.lib.stride_tricks.sliding_window_view(train[1:], T)
    x_val, y_val = fixed_windows(tokens[va], T) if va.stop > va.start else (
        np.zeros((0, T), np.float32), np.zeros((0, T), np.int32))
    x_test, y_test = fixed_windows(tokens[te], T)
    for a in (train, x_val, y_val, x_test, y_test):
        a.setflags(write=False)
    info = tuple(sorted((str(k), v) for k, v in stream.info.items()))
    return TextDataset(cfg.name, x_train, y_train, x_val, y_val, x_test, y_test, VOCAB_BYTES,
                       train_tokens=train, context=T, info=info)


def read_text_bytes(path: str | Path) -> tuple[np.ndarray, dict]:
    """The bytes of a UTF-8 file, or of every file under a folder (sorted by relative path, recursively,
    concatenated), as uint8 ``[L]``; DataError naming the path when it is missing, empty or not UTF-8."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"data.path = {str(path)!r} does not exist; give a UTF-8 text file or a folder of them")
    blobs = []
    for f in files:
        try:
            blob = f.read_bytes()
            blob.decode("utf-8")
        except OSError as e:
            raise DataError(f"{f}: cannot read ({e})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start}); data.name = 'text' reads "
                            "UTF-8 files only") from None
        blobs.append(blob)
    data = b"".join(blobs)
    if not data:
        raise DataError(f"data.path = {str(path)!r}: no bytes (empty file or folder)")
    return np.frombuffer(data, np.uint8), {"files": len(files)}


@register("text", num_classes=VOCAB_BYTES, text=True)
def text(cfg: DataConfig) -> TokenStream:
    """The UTF-8 file or folder ``data.path``, bytes as tokens."""
    if not cfg.path:
        raise DataError("data.name = 'text' needs data.path: a UTF-8 text file or a folder of them "
                        "(e.g. --set data.path=corpus.txt); data.name = 'pystdlib' needs none")
    tokens, info = read_text_bytes(cfg.path)
    return TokenStream(tokens, info)


TINYSTORIES_FILES = ("TinyStories-valid.txt",)
WIKITEXT2_FILES = ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw")


def _downloaded_text(name: str, files: tuple[str, ...]) -> list[Path]:
    """The files of the text data set ``name`` in ``$LTH_DATA_DIR/<name>``; DataError saying how to get them."""
    folder = data_dir() / name
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{name}: data set not found: {', '.join(missing)} missing in {folder}. To get it: run "
                        f"`lth data download {name}` (needs the internet; sha256-checked), or set LTH_DATA_DIR "
                        "to the data root that holds it")
    return [folder / f for f in files]


@register("tinystories", num_classes=VOCAB_BYTES, text=True)
def tinystories(cfg: DataConfig) -> TokenStream:
    """TinyStories (Eldan & Li 2023), the authors' validation file (``lth data download tinystories``):
    about 19 MB of simple English stories, split by position (80/10/10)."""
    tokens, info = read_text_bytes(_downloaded_text("tinystories", TINYSTORIES_FILES)[0])
    return TokenStream(tokens, info)


@register("wikitext2", num_classes=VOCAB_BYTES, text=True)
def wikitext2(cfg: DataConfig) -> TokenStream:
    """WikiText-2 raw (Merity et al. 2017; ``lth data download wikitext2``) with its own split: the train,
    valid and test files are the train, val and test parts (bytes as tokens, the raw text)."""
    parts = [read_text_bytes(f)[0] for f in _downloaded_text("wikitext2", WIKITEXT2_FILES)]
    a = len(parts[0])
    return TokenStream(np.concatenate(parts), {"files": len(parts)}, bounds=(a, a + len(parts[1])))


def pystdlib_files() -> list[Path]:
    """The running Python's standard-library ``.py`` files, sorted by relative path: every file under
    ``sysconfig.get_paths()["stdlib"]`` except installed packages (site-/dist-packages) and caches."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in root.rglob("*.py") if p.is_file() and not skip & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@register("pystdlib", num_classes=VOCAB_BYTES, text=True)
def pystdlib(cfg: DataConfig) -> TokenStream:
    """The zero-setup text corpus: the running Python's standard-library source (:func:`pystdlib_files`
    concatenated, cut at :data:`PYSTDLIB_BYTES`). Real code, no download, on every machine that runs lth;
    the fingerprint records the Python version, so a run on another Python is told apart."""
    import platform

    chunks, total, used = [], 0, 0
    for f in pystdlib_files():
        if total >= PYSTDLIB_BYTES:
            break
        try:
            blob = f.read_bytes()
        except OSError:
            continue  # an unreadable file: the sha256 in the fingerprint records what was read
        chunks.append(blob)
        total += len(blob)
        used += 1
    data = b"".join(chunks)[:PYSTDLIB_BYTES]
    if len(data) < 2**16:
        raise DataError(f"pystdlib: found only {len(data)} bytes of .py files under the standard library of "
                        f"{sys.executable}; use data.name = 'text' with data.path")
    return TokenStream(np.frombuffer(data, np.uint8),
                       {"python": platform.python_version(), "files": used})
