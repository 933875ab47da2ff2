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

User code runs only when work starts, and only code the user named:

- checking a setting (:meth:`Registry.check_name`, used by :mod:`lth.config`) imports nothing, so
  ``lth sweep --dry-run`` or ``lth settings`` never runs user code;
- an import path or entry point must name a function or a class defined in a user module, never a
  builtin or a member of the standard library (``builtins:input``, ``os:system`` are refused);
- a name read from a file (a stored run's ``hparams.json``, an export header) is used only when it is
  an entry already registered in this process (lth's own data sets, models and criteria), or when the
  user named it on the command line (:func:`trust`; ``--code``, ``eval-export --data``):
  :meth:`Registry.check_from_file`;
- :meth:`Registry.call` runs user code and turns its failure into one line naming the callable.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
import sys
from typing import Any, Callable

_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
TRUSTED: set[str] = set()  # import paths and entry-point names the user gave on the command line


def trust(*names: str) -> None:
    """Let names read from a file resolve to ``names`` (given by the user on the command line)."""
    TRUSTED.update(str(n) for n in names)


def _stdlib(module: str | None) -> bool:
    top = (module or "").partition(".")[0]
    return top in ("builtins", "__main__") or top in sys.stdlib_module_names


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
        self._builtin: set[str] | None = None

    def register(self, name: str, fn: Callable, *, replace: bool = False) -> Callable:
        """Add ``fn`` as ``name``; ValueError if the name is taken (unless ``replace``) or has a ':'."""
        if ":" in name:
            raise ValueError(f"{self.kind} name {name!r} may not contain ':' (that marks an import path)")
        if name in self.entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self.entries[name] = fn
        return fn

    def _load_builtins(self) -> None:
        if self._builtin is None:
            importlib.import_module(self.home)
            self._builtin = set(self.entries)  # what lth registers itself

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` is one of lth's own entries (its failures are lth's, not user code's)."""
        self._load_builtins()
        return name in self._builtin and self.entries.get(name) is not None

    def entry_points(self) -> dict[str, Any]:
        """Installed entry points of :attr:`group`, by name (read on every call: new installs count)."""
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=self.group)}

    def names(self) -> list[str]:
        """Built-in names, then entry-point names (import paths are not listed)."""
        self._load_builtins()
        return list(self.entries) + [n for n in self.entry_points() if n not in self.entries]

    def is_import_path(self, name: str) -> bool:
        return ":" in name

    def check_name(self, name: str) -> None:
        """RegistryError (one line) unless ``name`` is a registered name, an installed entry point's
        name or a well-formed import path; imports nothing (the import happens when work starts)."""
        if not isinstance(name, str):
            raise RegistryError(f"expected a {self.kind} name (a string), got {type(name).__name__}")
        if name in self.entries:
            return
        self._load_builtins()
        if name in self.entries:
            return
        if ":" in name:
            if not _IMPORT_PATH.fullmatch(name):
                raise RegistryError(f"{self.kind} {name!r}: expected an import path 'package.module:callable'")
            if _stdlib(name.partition(":")[0]):
                raise RegistryError(f"{self.kind} {name!r}: {name.partition(':')[0]!r} is Python's own "
                                    f"(builtins or the standard library); name a function or class of your "
                                    f"own module ({self.signature})")
            return
        if name not in self.entry_points():
            raise RegistryError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}; or an "
                                f"import path 'package.module:callable' to {self.signature}, or an entry point "
                                f"in group {self.group}")

    def check_from_file(self, name: str, key: str, source: str, option: str = "--code") -> None:
        """RegistryError naming ``source`` unless ``name``, read from the file ``source``, may be used:
        an entry registered in this process (no import), or a name the user trusted on the command line
        (:func:`trust`). A file never makes lth import or call code it names."""
        if not isinstance(name, str):
            raise RegistryError(f"{source}: {key} is a {type(name).__name__}, not a {self.kind} name")
        if name in TRUSTED:
            return
        self._load_builtins()
        if name in self.entries:
            return
        raise RegistryError(f"{source}: {key} = {name!r} is not a built-in {self.kind}, and lth imports no code "
                            f"named inside a file; if you trust it, name it on the command line: "
                            f"{option} {name}")

    def call(self, name: str, fn: Callable, *args, passthrough: tuple = ()) -> Any:
        """``fn(*args)`` (the entry ``name``); an exception from user code becomes one RegistryError line
        naming the callable (lth's own entries, and ``passthrough`` errors, raise as they are)."""
        if self.is_builtin(name):
            return fn(*args)
        try:
            return fn(*args)
        except passthrough:
            raise
        except Exception as e:  # noqa: BLE001 - user code: report it in one line
            raise RegistryError(f"{self.kind} {name!r} failed: {type(e).__name__}: {_one_line(e)}") from None

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
            self._check_object(f"{self.kind} {name!r}: entry point {eps[name].value!r}", fn)
            self.entries.setdefault(name, fn)
            return fn
        raise RegistryError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}; or an import "
                            f"path 'package.module:callable' to {self.signature}, or an entry point in group "
                            f"{self.group}")

    def _import(self, path: str) -> Callable:
        module, _, attr = path.partition(":")
        self.check_name(path)  # well-formed, not a module of Python's own: nothing imported yet
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
        self._check_object(f"{self.kind} {path!r}", obj)
        return obj

    def _check_object(self, what: str, obj: Any) -> None:
        """RegistryError unless ``obj`` is a function or class defined in a user module."""
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            raise RegistryError(f"{what} is a {type(obj).__name__}, not a function or class ({self.signature})")
        if _stdlib(getattr(obj, "__module__", None)):
            raise RegistryError(f"{what} is defined in {obj.__module__!r}, Python's own (builtins or the standard "
                                f"library); name a function or class of your own module ({self.signature})")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""


MODELS = Registry("model", "lth.models", "lth.models",
                  "builder(cfg: ModelConfig, num_classes: int, input_shape: tuple) -> flax.linen.Module")
DATASETS = Registry("data set", "lth.datasets", "lth.data",
                    "loader(cfg: DataConfig) -> (x_train, y_train, x_test, y_test)")
CRITERIA = Registry("criterion", "lth.criteria", "lth.prune.criteria",
                    "score(params, signals) -> scores shaped like params")
