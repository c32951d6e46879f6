"""Record first uses of the pools, by wrapping tokenizers and torch when they get imported.

tokguard must not import them itself (tokenizers costs ~14 ms, torch seconds), so a small
meta-path finder runs a callback right after their import finishes; if they are already
imported, the callback runs at once. wrapt has such post-import hooks, but importing wrapt
costs ~55 ms, ten times the budget of ``import tokguard``, so this is the ~30 lines needed.

The wrappers are plain functions: their hot path is one global lookup and one branch, and
once a pool is known to be started they stop doing anything else.
"""

from __future__ import annotations

import sys

from . import _env, _probes, _sites

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

_hooks: dict[str, list[Callable[[ModuleType], None]]] = {}


class _Loader:
    """Runs the original loader, then the hooks for the module it loaded."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        # Put the real loader back first, so nothing downstream ever sees this one.
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _run_hooks(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _Finder:
    """A meta-path finder that only answers for modules with a pending hook."""

    _busy: set[str] = set()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
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


def _run_hooks(module: ModuleType) -> None:
    from . import _report

    for hook in _hooks.pop(module.__name__, []):
        try:
            hook(module)
        except Exception as exc:
            # An instrumentation bug must never break the user's import.
            _report.internal_error(f"instrumenting {module.__name__}", exc)


def when_imported(name: str, hook: Callable[[ModuleType], None]) -> None:
    """Run ``hook(module)`` once ``name`` is imported, or now if it already is."""
    module = sys.modules.get(name)
    if module is not None:
        _hooks.setdefault(name, []).append(hook)
        _run_hooks(module)
        return
    _hooks.setdefault(name, []).append(hook)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def _wraps(method: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    # functools is imported here: it is not loaded at interpreter start, tokenizers is.
    import functools

    return functools.wraps(method)


# --- tokenizers -------------------------------------------------------------------------

# Calls that start the rayon pool when parallelism is on (tokenizers' Rust source, utils/parallelism.rs).
RAYON_METHODS = (
    "encode_batch",
    "encode_batch_fast",
    "decode_batch",
    "train",
    "train_from_iterator",
)
# Calls that start the global tokio runtime.
TOKIO_PREFIX = "async_"

tokio_poisoned = False
"""Set in a child whose parent had started tokio: async calls would hang there."""

TOKIO_MESSAGE = (
    "tokenizers.Tokenizer.{name}() in a forked child whose parent had started tokenizers' "
    "async (tokio) runtime would hang forever, and nothing in the child can repair it "
    "(see the tokguard docs, messages page). Use the synchronous call here, or avoid async_* calls in the parent "
    "before it forks, or start this worker with spawn/forkserver."
)


rayon_poisoned = False
"""Set in a child whose parent had run the rayon pool: the child's copy of it is dead."""

RAYON_MESSAGE = (
    "TOKENIZERS_PARALLELISM={value!r} in a forked child whose parent had run tokenizers' "
    "parallel (rayon) pool: a batch call would hang forever. tokguard set "
    "it back to 'false' for this process; set the variable in the parent instead, or start "
    "this worker with spawn/forkserver."
)


def _note_rayon() -> None:
    if not _env.c_parallel():  # the hot path: every batch call while parallelism is off
        return
    if rayon_poisoned:
        value = _env.c_getenv(_env.VAR)
        # Code in the child switched parallelism back on: the next batch call would hang.
        _env.force_serial()
        import warnings

        from ._report import UnsafeForkWarning

        warnings.warn(UnsafeForkWarning(RAYON_MESSAGE.format(value=value)), stacklevel=3)
        return
    _probes.rayon_first_use = _sites.user_site(_sites.POOL_LIBRARIES, depth=2) or _probes.UNRECORDED


def _wrap_rayon(method: Callable[..., Any]) -> Callable[..., Any]:
    @_wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _probes.rayon_first_use is None:
            _note_rayon()
        return method(self, *args, **kwargs)

    wrapper.__tokguard_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


# A single encode starts the pool only with padding on. Reading ``Tokenizer.padding`` builds
# a dict (2.4 us, a fifth of a short encode), so the ids of tokenizers that may pad are kept
# here, fed by every way padding gets switched on or off: enable_padding, no_padding, the
# from_* loaders, and unpickling. A stale id (a tokenizer collected, its id reused) can
# only make tokguard look at the environment once more, never miss a pool.
_maybe_padded: set[int] = set()
PADDING_LOADERS = ("from_file", "from_str", "from_buffer", "from_pretrained")


def _wrap_encode(method: Callable[..., Any]) -> Callable[..., Any]:
    @_wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _probes.rayon_first_use is None and id(self) in _maybe_padded:
            _note_rayon()
        return method(self, *args, **kwargs)

    wrapper.__tokguard_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


def _note_padding(tokenizer: Any) -> None:
    if tokenizer.padding is not None:
        _maybe_padded.add(id(tokenizer))
        _watch_encode(type(tokenizer))
    else:
        _maybe_padded.discard(id(tokenizer))


def _watch_encode(cls: Any) -> None:
    """Wrap ``encode`` once some tokenizer pads: until then a plain encode pays nothing.

    Without padding a single encode never starts the pool, and a wrapper's own call costs
    about 3 % of a short encode.
    """
    if not getattr(cls.encode, "__tokguard_wrapped__", False):
        cls.encode = _wrap_encode(cls.encode)


def _wrap_padding_setter(method: Callable[..., Any]) -> Callable[..., Any]:
    @_wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        _note_padding(self)
        return result

    return wrapper


def _wrap_loader(method: Callable[..., Any]) -> Any:
    @_wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tokenizer = method(*args, **kwargs)
        _note_padding(tokenizer)
        return tokenizer

    return staticmethod(wrapper)


def _wrap_tokio(method: Callable[..., Any], name: str) -> Callable[..., Any]:
    @_wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if tokio_poisoned:
            from ._report import UnsafeForkError

            raise UnsafeForkError(TOKIO_MESSAGE.format(name=name))
        if _probes.tokio_first_use is None:
            _probes.tokio_first_use = _sites.user_site(_sites.POOL_LIBRARIES) or _probes.UNRECORDED
        return method(self, *args, **kwargs)

    wrapper.__tokguard_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


def instrument_tokenizers(module: ModuleType) -> None:
    cls = module.Tokenizer
    if getattr(cls.encode_batch, "__tokguard_wrapped__", False):
        return
    for name in RAYON_METHODS:
        if hasattr(cls, name):
            setattr(cls, name, _wrap_rayon(getattr(cls, name)))
    for name in ("enable_padding", "no_padding", "__setstate__"):
        if hasattr(cls, name):
            setattr(cls, name, _wrap_padding_setter(getattr(cls, name)))
    for name in PADDING_LOADERS:
        if hasattr(cls, name):
            setattr(cls, name, _wrap_loader(getattr(cls, name)))
    for name in dir(cls):
        if name.startswith(TOKIO_PREFIX):
            setattr(cls, name, _wrap_tokio(getattr(cls, name), name))


def instrument_late_tokenizers(module: ModuleType) -> None:
    """tokenizers was imported before tokguard: earlier batch calls went unseen.

    With parallelism on and native threads about, assume the pool may have started: the
    child repair costs little, a hang costs a worker.
    """
    if getattr(module.Tokenizer.encode_batch, "__tokguard_wrapped__", False):
        # A reload of tokguard: the wrappers have seen every call since the first import,
        # so nothing went unseen and guessing now would only cry wolf.
        return
    instrument_tokenizers(module)
    # Judged on the value earlier calls saw: where tokguard just set its default, the
    # variable was unset until now, and unset means parallel. The probe re-reads the
    # current value at each fork, so a user who later sets it to true is still covered.
    was_parallel = _env.TOKGUARD_SET_DEFAULT or _env.parallel(_env.c_getenv(_env.VAR))
    _probes.rayon_maybe_started = was_parallel and _has_native_threads()


def _has_native_threads() -> bool:
    from . import _threads

    census = _threads.census()
    return census is None or census.native_threads > 0


# --- torch ------------------------------------------------------------------------------

_torch_restores: list[Callable[[], None]] = []  # put back what instrument_torch replaced

# Bare tensor ops that start the pool in retrieval code (``torch.topk(q @ E.T, k)``), beside
# module calls. Each is a Python-level attribute, so a wrapper costs one call (~0.3 us) and
# nothing once a multi-threaded call was seen; every other op (topk alone, sum, conv...)
# is not seen: a C-level dispatch hook would tax every op, and the census finds the pool
# regardless of where it started.
TENSOR_ENTRY_POINTS = ("matmul", "mm", "bmm", "einsum")
TENSOR_METHODS = ("__matmul__", "__rmatmul__")


def _record_torch_first_use() -> None:
    """The first multi-threaded call: name it, then put every original back."""
    _probes.torch_first_use = _sites.user_site(_sites.POOL_LIBRARIES, depth=2) or _probes.UNRECORDED
    while _torch_restores:
        _torch_restores.pop()()


def _replace(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    original = getattr(owner, name, None)
    if original is None:
        return
    # Tensor.__matmul__ is inherited from the C base class: restore by deleting ours.
    own = name in vars(owner)
    setattr(owner, name, make(original))

    def restore() -> None:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)

    _torch_restores.append(restore)


def instrument_torch(module: ModuleType) -> None:
    """Name the model call or matmul that first ran torch multi-threaded, for the report.

    ``nn.Module`` calls, ``torch.matmul``/``mm``/``bmm``/``einsum`` and the ``@`` operator
    are seen. The wrappers remove themselves at the first multi-threaded call; where torch
    always runs at one thread (``OMP_NUM_THREADS=1``) they stay, at about 0.35 us per call.
    The pool itself is found by the thread census, whichever op started it.
    """
    module_cls = module.nn.Module
    if _torch_restores or _probes.torch_first_use is not None:
        return
    get_num_threads = module.get_num_threads

    def watch(original: Any) -> Any:
        @_wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _probes.torch_first_use is None and get_num_threads() > 1:
                _record_torch_first_use()
            return original(*args, **kwargs)

        return wrapper

    if hasattr(module_cls, "_call_impl"):
        _replace(module_cls, "_call_impl", watch)
    for name in TENSOR_ENTRY_POINTS:
        _replace(module, name, watch)
    for name in TENSOR_METHODS:
        _replace(module.Tensor, name, watch)


def install() -> None:
    """Instrument tokenizers and torch now or when they get imported (idempotent)."""
    late = "tokenizers" in sys.modules
    when_imported("tokenizers", instrument_late_tokenizers if late else instrument_tokenizers)
    when_imported("torch", instrument_torch)
