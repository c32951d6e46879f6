"""Post-import hooks: run a callback right after a module is imported, or now if it is.

tokguard must not import the libraries it watches itself (tokenizers costs ~14 ms, torch
seconds), so a small meta-path finder runs a callback right after their import finishes.
wrapt has such post-import hooks, but importing wrapt costs ~55 ms, ten times the budget of
``import tokguard``, so this module is the few dozen lines needed. The pools (``pools``)
say which modules they watch; master mode and ``single_threaded()`` use the same hooks.
"""

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

_hooks: "dict[str, list[Callable[[ModuleType], None]]]" = {}
_before: "dict[str, list[Callable[[], None]]]" = {}


class _Loader:
    """Runs the original loader, then the hooks for the module it loaded."""

    def __init__(self, loader: "Any") -> None:
        self.loader = loader

    def create_module(self, spec: "ModuleSpec") -> "ModuleType | None":
        return self.loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: "ModuleType") -> None:
        # Put the real loader back first, so nothing downstream ever sees this one.
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _run_hooks(module)

    def __getattr__(self, name: str) -> "Any":
        return getattr(self.loader, name)


class _Finder:
    """A meta-path finder that only answers for modules with a pending hook."""

    _busy: set[str] = set()

    def find_spec(
        self, fullname: str, path: "Sequence[str] | None" = None, target: "ModuleType | None" = None
    ) -> "ModuleSpec | None":
        if fullname in _before:
            _run_before(fullname)
        if fullname not in _hooks or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _Loader(spec.loader)  # type: ignore[assignment]
                    return spec
            return None
        finally:
            self._busy.discard(fullname)

    def invalidate_caches(self) -> None:
        pass


def _run_hooks(module: "ModuleType") -> None:
    for hook in _hooks.pop(module.__name__, []):
        try:
            hook(module)
        except Exception as exc:
            # An instrumentation bug must never break the user's import.
            from ._report import internal_error

            internal_error(f"instrumenting {module.__name__}", exc)


def _run_before(name: str) -> None:
    for hook in _before.pop(name, []):
        try:
            hook()
        except Exception as exc:
            from ._report import internal_error

            internal_error(f"preparing the import of {name}", exc)


def _watch_imports() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def when_imported(name: str, hook: "Callable[[ModuleType], None]") -> None:
    """Run ``hook(module)`` once ``name`` is imported, or now if it already is."""
    module = sys.modules.get(name)
    if module is not None:
        _hooks.setdefault(name, []).append(hook)
        _run_hooks(module)
        return
    _hooks.setdefault(name, []).append(hook)
    _watch_imports()


def before_import(name: str, hook: "Callable[[], None]") -> None:
    """Run ``hook()`` once, when the import of ``name`` starts; never if it is imported already.

    For a module that reads what we changed, once, while it is imported (``torch._dynamo``
    lists torch's functions by identity).
    """
    if name not in sys.modules:
        _before.setdefault(name, []).append(hook)
        _watch_imports()


def install() -> None:
    """Instrument every pool now or when its library gets imported (idempotent)."""
    from . import pools

    pools.install()
