"""tokenizers' async runtime (tokio): one global runtime, started by the first ``async_*`` call.

Nothing in a child can restart it, so the repair turns the child's hang into an error.
"""

from __future__ import annotations

from .. import _sites
from . import UNRECORDED, Pool, wraps

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

    from .. import _threads
    from .._report import Hazard

PREFIX = "async_"
"""tokenizers.Tokenizer methods with this prefix start the global tokio runtime."""

poisoned = False
"""Set in a child whose parent had started tokio: async calls would hang there."""

MESSAGE = (
    "tokenizers.Tokenizer.{name}() in a forked child whose parent had started tokenizers' "
    "async (tokio) runtime would hang forever, and nothing in the child can repair it "
    "(see the tokguard docs, messages page). Use the synchronous call here, or avoid async_* "
    "calls in the parent before it forks, or start this worker with spawn/forkserver."
)


class TokenizersTokio(Pool):
    id = "tokenizers-tokio"
    title = "tokenizers async runtime (tokio)"
    repair = (
        "async_* calls in the child raise UnsafeForkError instead of hanging; "
        "the synchronous calls keep working"
    )
    description = (
        "Started by the first async_* call of a tokenizers.Tokenizer. Found by the "
        "instrumentation's record of that call."
    )

    def instrument(self, module: ModuleType, late: bool) -> None:
        cls = module.Tokenizer
        for name in dir(cls):
            method = getattr(cls, name)
            if name.startswith(PREFIX) and not getattr(method, "__tokguard_wrapped__", False):
                setattr(cls, name, _wrap(method, name))

    def detect(self, census: _threads.Census | None) -> Hazard | None:
        if self.first_use is None:
            return None
        return self.hazard(
            "an async_* tokenizers call started the global tokio runtime", self.first_use
        )

    def repair_child(self) -> None:
        global poisoned
        poisoned = True
        self.first_use = None


POOL = TokenizersTokio()


def _wrap(method: Callable[..., Any], name: str) -> Callable[..., Any]:
    @wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if poisoned:
            from .._report import UnsafeForkError

            raise UnsafeForkError(MESSAGE.format(name=name))
        if POOL.first_use is None:
            POOL.first_use = _sites.user_site(_sites.POOL_LIBRARIES) or UNRECORDED
        return method(self, *args, **kwargs)

    wrapper.__tokguard_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper
