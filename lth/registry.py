"""Open registries: models, data sets and pruning criteria by name, by import path, or by entry point.

A registry entry is a plain callable:

- a **model builder** ``builder(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...])
  -> flax.linen.Module`` whose ``__call__(x [B, *input_shape], train: bool = False)`` returns logits
  ``[B, num_classes]`` (the module may declare its structure, :class:`lth.models.Structure`);
- a **data set loader** ``loader(cfg: DataConfig) -> (x_train, y_train, x_test, y_test)`` (images
  ``uint8 [N, H, W, C]`` or float inputs ``[N, ...]``, integer labels ``[N]``); optional attributes
  ``loader.num_classes`` (default: the largest label + 1) and ``loader.val_size`` (default:
  ``min(5000, N // 10)``);
- a **criterion** ``score(params, signals: lth.prune.criteria.Signals) -> scores`` (a pytree shaped
  like ``params``, higher = keep).

A name in ``model.name``, ``data.name`` or ``prune.criterion`` is looked up in this order: the
built-in entries (registered by ``lth.models``, ``lth.data``, ``lth.prune.criteria`` with their
``register`` decorators), installed entry points of the group (``lth.models``, ``lth.datasets``,
``lth.criteria``: ``[project.entry-points."lth.models"] mynet = "mypkg.nets:build"``), and an import
path ``"package.module:callable"``. Built-in entries are loaded lazily (importing this module imports
nothing of lth, so :mod:`lth.config` can ask a registry without an import circle).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, Callable


class RegistryError(ValueError):
    """A name no registry entry, entry point or import path resolves to; the message says what was tried."""


class Registry:
    """Name -> callable, with entry points and ``"package.module:callable"`` import paths.

    ``kind``: what an entry is ("model", "data set", "criterion"); ``group``: its entry-point group;
    ``home``: the lth module whose import registers the built-in entries.
    """

    def __init__(self, kind: str, group: str, home: str, signature: str):
        self.kind, self.group, self.home, self.signature = kind, group, home, signature
        self.entries: dict[str, Callable] = {}
        self._paths: dict[str, Callable] = {}  # import paths resolved so far

    def register(self, name: str, fn: Callable, *, replace: bool = False) -> Callable:
        """Add ``fn`` as ``name``; ValueError if the name is taken (unless ``replace``) or has a ':'."""
        if ":" in name:
            raise ValueError(f"{self.kind} name {name!r} may not contain ':' (that marks an import path)")
        if name in self.entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self.entries[name] = fn
        return fn

    def _load_builtins(self) -> None:
        importlib.import_module(self.home)

    def entry_points(self) -> dict[str, Any]:
        """Installed entry points of :attr:`group`, by name (read on every call: new installs count)."""
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=self.group)}

    def names(self) -> list[str]:
        """Built-in names, then entry-point names (import paths are not listed)."""
        self._load_builtins()
        return list(self.entries) + [n for n in self.entry_points() if n not in self.entries]

    def is_import_path(self, name: str) -> bool:
        return ":" in name

    def resolve(self, name: str) -> Callable:
        """The callable ``name`` stands for; RegistryError (one line) naming what was tried otherwise."""
        if name in self.entries:
            return self.entries[name]
        self._load_builtins()
        if name in self.entries:
            return self.entries[name]
        if ":" in name:
            if name not in self._paths:
                self._paths[name] = self._import(name)
            return self._paths[name]
        eps = self.entry_points()
        if name in eps:
            try:
                fn = eps[name].load()
            except Exception as e:  # noqa: BLE001 - user code: report it in one line
                raise RegistryError(f"{self.kind} {name!r}: entry point {eps[name].value!r} (group {self.group}) "
                                    f"does not load: {type(e).__name__}: {_one_line(e)}") from None
            if not callable(fn):
                raise RegistryError(f"{self.kind} {name!r}: entry point {eps[name].value!r} is not callable")
            self.entries.setdefault(name, fn)
            return fn
        raise RegistryError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}; or an import "
                            f"path 'package.module:callable' to {self.signature}, or an entry point in group "
                            f"{self.group}")

    def _import(self, path: str) -> Callable:
        module, _, attr = path.partition(":")
        if not module or not attr:
            raise RegistryError(f"{self.kind} {path!r}: expected an import path 'package.module:callable'")
        try:
            obj = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - user code: report it in one line
            raise RegistryError(f"{self.kind} {path!r}: module {module!r} does not import ({type(e).__name__}: "
                                f"{_one_line(e)}); registered {self.kind}s: {', '.join(self.names())}") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise RegistryError(f"{self.kind} {path!r}: module {module!r} has no attribute {attr!r}; "
                                    f"registered {self.kind}s: {', '.join(self.names())}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise RegistryError(f"{self.kind} {path!r} is a {type(obj).__name__}, not a callable "
                                f"({self.signature})")
        return obj


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""


MODELS = Registry("model", "lth.models", "lth.models",
                  "builder(cfg: ModelConfig, num_classes: int, input_shape: tuple) -> flax.linen.Module")
DATASETS = Registry("data set", "lth.datasets", "lth.data",
                    "loader(cfg: DataConfig) -> (x_train, y_train, x_test, y_test)")
CRITERIA = Registry("criterion", "lth.criteria", "lth.prune.criteria",
                    "score(params, signals) -> scores shaped like params")
