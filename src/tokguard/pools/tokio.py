"""A tokio runtime of any extension module (Rust), found by tokio's own thread names.

A multi-threaded tokio runtime runs its tasks on worker threads named ``tokio-rt-worker``
(``tokio-runtime-worker`` in older tokio, cut to ``tokio-runtime-w`` by Linux). A forked
child inherits the runtime's queues but none of its workers: a task it hands the runtime
never runs, and the child hangs (tokenizers' ``async_*`` calls, hang-table row 9). Nothing in
the child can restart a runtime another library owns.

Not tied to one library, because any extension may embed tokio: loaded by the first census
that finds a thread besides the caller's (``pools.THREADED``). Where
the threads' owner is known from the libraries loaded, the report names it; runtimes that
a pool of their own reports already (tokenizers' recorded ``async_*`` calls, polars'
query pool) are left to it. hf_xet names its threads itself (``hf_xet_tokio``).
"""

from __future__ import annotations

import sys

from . import Pool

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .. import _threads
    from .._report import Hazard

THREAD_NAMES = frozenset({"tokio-rt-worker", "tokio-runtime-w"})

# Libraries measured to start a tokio runtime with tokio's thread names, and how.
OWNERS = (
    ("tokenizers", "tokenizers is loaded: its async_* calls run on a global tokio runtime"),
    ("polars", "polars is loaded: its queries and async readers run on a tokio runtime"),
)


class Tokio(Pool):
    id = "tokio"
    found_by_threads = True
    title = "tokio runtime of an extension module"
    description = (
        "Started by a Rust extension's first async work. Found by tokio's worker threads' "
        "names, tokio-rt-worker (tokio-runtime-w in older tokio), in /proc/self/task/*/comm; "
        "the report names the library where the loaded modules tell."
    )
    fixes = (
        "fork before the first call that starts the runtime, or make those calls only in "
        "the workers",
    )

    def detect(self, census: _threads.Census | None) -> Hazard | None:
        if census is not None and not census.native:
            return None
        from .. import _threads

        names = _threads.native_names(census)
        threads = sum(name in THREAD_NAMES for name in names)
        if not threads or _reported_elsewhere(names):
            return None
        owners = [why for module, why in OWNERS if module in sys.modules]
        owner = "; ".join(owners) if owners else "no library tokguard knows owns it"
        return self.hazard(
            f"{threads} tokio worker thread(s) are alive ({owner}): a forked child that hands "
            "the runtime work hangs"
        )


def _reported_elsewhere(names: list[str]) -> bool:
    """Whether a library's own pool reports these threads already (one entry per runtime)."""
    tokenizers = sys.modules.get(f"{__package__}.tokenizers_tokio")
    if tokenizers is not None and tokenizers.POOL.first_use is not None:
        return True
    return "polars" in sys.modules and any(
        name.startswith("polars-") and name[7:].isdigit() for name in names
    )


POOL = Tokio()
