"""tokenizers' parallel pool (rayon): started by batch calls while parallelism is on.

The wrappers are plain functions: their hot path is one global lookup and one branch, and
once the pool is known to be started they stop doing anything else.
"""

from __future__ import annotations

import os

from .. import _env, _sites, _threads
from . import UNRECORDED, Pool, block_restores, wraps

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

    from .._report import Hazard

# Calls that start the rayon pool when parallelism is on (tokenizers' Rust source, utils/parallelism.rs).
RAYON_METHODS = (
    "encode_batch",
    "encode_batch_fast",
    "decode_batch",
    "train",
    "train_from_iterator",
)

ABSENT = "\0absent"
"""Saved for a variable not in os.environ (its values are str: this one cannot be real)."""

poisoned = False
"""Set in a child whose parent had run the rayon pool: the child's copy of it is dead."""

# A single encode starts the pool only with padding on, and only while parallelism is on. A
# short encode is too quick to check either on every call: reading ``Tokenizer.padding``
# builds a dict (2.4 us, a fifth of a short encode), reading the C environment costs 5 %,
# and even a wrapper that checks nothing costs 2 %. So ``encode`` is the original method
# except while a padded encode could start the pool unrecorded: some tokenizer pads,
# parallelism is on, and no first use is recorded yet (``_sync_encode``). The ids of the
# tokenizers that may pad are kept here, fed by every way padding gets switched on or off:
# enable_padding, no_padding, the from_* loaders, and unpickling. A stale id (a tokenizer
# collected, its id reused) can only make tokguard look once more, never miss a pool.
_maybe_padded: set[int] = set()
_classes: list[Any] = []  # the Tokenizer classes instrumented
_watching_encode = False

MESSAGE = (
    "TOKENIZERS_PARALLELISM={value!r} in a forked child whose parent had run tokenizers' "
    "parallel (rayon) pool: a batch call would hang forever. tokguard set "
    "it back to 'false' for this process; set the variable in the parent instead, or start "
    "this worker with spawn/forkserver."
)


class TokenizersRayon(Pool):
    id = "tokenizers-rayon"
    title = "tokenizers parallel pool (rayon)"
    repair = f"{_env.PARALLELISM_VAR}=false in the child: it tokenizes serially, the parent keeps its value"
    kept_cold = f"{_env.PARALLELISM_VAR}=false while cold, the previous value put back after"
    covered_by = (
        ("datasets.", "datasets", "it sets TOKENIZERS_PARALLELISM=false before forking its pool"),
    )
    description = (
        "Started by a batch call (encode_batch, decode_batch, train, a padded encode) while "
        f"{_env.PARALLELISM_VAR} is true. Found by the instrumentation's record of such a call."
    )

    def __init__(self) -> None:
        self._first_use: str | None = None
        super().__init__()
        self.maybe_started = False
        """tokenizers was imported before tokguard, with parallelism on: earlier calls unseen."""

    @property
    def first_use(self) -> str | None:
        return self._first_use

    @first_use.setter
    def first_use(self, value: str | None) -> None:
        # Whether a padded encode still needs watching depends on it (_sync_encode).
        self._first_use = value
        if _classes:
            _sync_encode()

    def instrument(self, module: ModuleType, late: bool) -> None:
        if late:
            _instrument_late(module)
        else:
            _instrument(module)

    def detect(self, census: _threads.Census | None) -> Hazard | None:
        if self.first_use is None and not self.maybe_started and not _padded_unwatched():
            return None
        var = _env.PARALLELISM_VAR
        in_block, saved = block_restores(self)
        if in_block:
            value = c_value_of(saved)
            # The child leaves the block too and gets this value back; unset counts as
            # parallel there, since tokenizers' own atfork handler saw the block's "false".
            if value is not None and not _env.parallel(value):
                return None
            shown = (
                f"{value!r} once the single_threaded() block ends"
                if value
                else "unset once the single_threaded() block ends"
            )
        else:
            value = _env.c_getenv(var)
            if value is None or not _env.parallel(value):
                # Unset: tokenizers' own atfork handler makes the child serial (hang-table row 1).
                # A false value: the child inherits it and stays serial.
                return None
            shown = repr(value)
        if self.first_use is not None:
            evidence = f"a batch call ran with {var}={shown}, which starts the rayon pool"
        elif not self.maybe_started:
            evidence = (
                f"a tokenizer pads and {var}={shown}, set where tokguard could not see it "
                "(by C code): a padded encode may have started the rayon pool unseen"
            )
        else:
            evidence = (
                f"tokenizers was imported before tokguard and {var}={shown}; "
                "a batch call may have started the rayon pool unseen"
            )
        return self.hazard(
            evidence, self.first_use or "not recorded (before tokguard was imported)"
        )

    def cold_save(self) -> tuple[str, str | None]:
        """(value in os.environ or ``ABSENT``, value in the C environment or None)."""
        var = _env.PARALLELISM_VAR
        return os.environ.get(var, ABSENT), _env.c_getenv(var)

    def cool(self) -> None:
        _env.force_serial()

    def is_cold(self) -> bool:
        return not _env.c_parallel()

    def put_back(self, saved: object, repaired: bool = False) -> None:
        var = _env.PARALLELISM_VAR
        if repaired or not isinstance(saved, tuple) or _env.c_getenv(var) != "false":
            return  # the child stays serial, or the variable was changed since
        environ_value, c_value = saved
        if environ_value == ABSENT:
            os.environ.pop(var, None)
        else:
            os.environ[var] = environ_value
        # os.environ's view may differ from the C one (os.putenv, C code): restore that exactly.
        if c_value is None:
            os.unsetenv(var)
        else:
            os.putenv(var, c_value)

    def repair_child(self) -> None:
        global poisoned
        _env.force_serial()
        poisoned = True
        # The pool is the parent's; this process has none, and its tokenizers are serial now.
        self.first_use = None
        self.maybe_started = False


POOL = TokenizersRayon()


def c_value_of(saved: object) -> str | None:
    """The C-environment value in what ``cold_save`` saved (None: unset, or nothing saved)."""
    return saved[1] if isinstance(saved, tuple) else None


def _note_rayon() -> None:
    if not _env.c_parallel():  # the hot path: every batch call while parallelism is off
        return
    if poisoned:
        value = _env.c_getenv(_env.PARALLELISM_VAR)
        # Code in the child switched parallelism back on: the next batch call would hang.
        _env.force_serial()
        import warnings

        from .._report import UnsafeForkWarning

        warnings.warn(UnsafeForkWarning(MESSAGE.format(value=value)), stacklevel=3)
        return
    POOL.first_use = _sites.user_site(_sites.POOL_LIBRARIES, depth=2) or UNRECORDED


def _wrap_rayon(method: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if POOL.first_use is None:
            _note_rayon()
        return method(self, *args, **kwargs)

    wrapper.__tokguard_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


PADDING_LOADERS = ("from_file", "from_str", "from_buffer", "from_pretrained")


def _wrap_encode(method: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if POOL.first_use is None and id(self) in _maybe_padded:
            _note_rayon()
        return method(self, *args, **kwargs)

    wrapper.__tokguard_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


def _note_padding(tokenizer: Any) -> None:
    if tokenizer.padding is not None:
        _maybe_padded.add(id(tokenizer))
    else:
        _maybe_padded.discard(id(tokenizer))
    _sync_encode()


def _sync_encode() -> None:
    """Wrap ``encode`` while a padded encode could start the pool unrecorded; unwrap it after.

    Called wherever one of the three conditions changes: padding switched, the variable set
    from Python (``_env.on_parallelism_change``), a first use recorded or forgotten.
    """
    global _watching_encode
    if not _classes:
        return  # not instrumented yet
    _watching_encode = bool(_maybe_padded) and POOL.first_use is None and _env.c_parallel()
    for cls in _classes:
        wrapped = getattr(cls.encode, "__tokguard_wrapped__", False)
        if _watching_encode and not wrapped:
            cls.encode = _wrap_encode(cls.encode)
        elif wrapped and not _watching_encode:
            cls.encode = cls.encode.__wrapped__


def _padded_unwatched() -> bool:
    """A tokenizer pads and parallelism is on, which tokguard did not hear of (set by C code):
    padded encodes may have run unwatched. Read only at a fork, where a tokenizer pads."""
    return bool(_maybe_padded) and not _watching_encode and _env.c_parallel()


def _wrap_padding_setter(method: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        _note_padding(self)
        return result

    return wrapper


def _wrap_loader(method: Callable[..., Any]) -> Any:
    @wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tokenizer = method(*args, **kwargs)
        _note_padding(tokenizer)
        return tokenizer

    return staticmethod(wrapper)


def _instrument(module: ModuleType) -> None:
    cls = module.Tokenizer
    if getattr(cls.encode_batch, "__tokguard_wrapped__", False):
        return
    if not _classes:
        _env.on_parallelism_change(_sync_encode)
    _classes.append(cls)
    for name in RAYON_METHODS:
        if hasattr(cls, name):
            setattr(cls, name, _wrap_rayon(getattr(cls, name)))
    for name in ("enable_padding", "no_padding", "__setstate__"):
        if hasattr(cls, name):
            setattr(cls, name, _wrap_padding_setter(getattr(cls, name)))
    for name in PADDING_LOADERS:
        if hasattr(cls, name):
            setattr(cls, name, _wrap_loader(getattr(cls, name)))


def _instrument_late(module: ModuleType) -> None:
    """tokenizers was imported before tokguard: earlier batch calls went unseen.

    With parallelism on and native threads about, assume the pool may have started: the
    child repair costs little, a hang costs a worker.
    """
    if getattr(module.Tokenizer.encode_batch, "__tokguard_wrapped__", False):
        # A reload of tokguard: the wrappers have seen every call since the first import,
        # so nothing went unseen and guessing now would only cry wolf.
        return
    _instrument(module)
    # Judged on the value earlier calls saw: where tokguard just set its default, the
    # variable was unset until now, and unset means parallel. The probe re-reads the
    # current value at each fork, so a user who later sets it to true is still covered.
    was_parallel = _env.TOKGUARD_SET_DEFAULT or _env.parallel(_env.c_getenv(_env.PARALLELISM_VAR))
    POOL.maybe_started = was_parallel and _has_native_threads()


def _has_native_threads() -> bool:
    census = _threads.census()
    return census is None or census.native_threads > 0
