"""polars' thread pool (rayon, threads named ``polars-N``), started by the first parallel query.

After a ``group_by`` (or any parallel query) in the parent, the same query in a forked child
hangs forever at 0 % CPU: the child inherits the pool's state but none of its threads. No
repair exists in the child, so tokguard reports the fork (warn) or refuses it (raise).

Evidence: the pool's worker threads, by name, from ``/proc/self/task/*/comm``. ``import
polars`` alone starts only a helper thread (``polars-ooc-clea``, no digits), so an imported
but unused polars is not reported. Read only where polars is imported, so a process without
it pays one dict lookup per fork.
"""

from __future__ import annotations

import sys

from . import Pool

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .. import _threads
    from .._report import Hazard

_PREFIX = "polars-"


def pool_threads(census: _threads.Census | None = None) -> int:
    """How many ``polars-N`` worker threads are alive now (0 where /proc cannot say)."""
    from .. import _threads

    return sum(
        name.startswith(_PREFIX) and name[len(_PREFIX) :].isdigit()
        for name in _threads.native_names(census)
    )


class Polars(Pool):
    id = "polars"
    found_by_threads = True
    title = "polars thread pool (rayon)"
    description = (
        "Started by the first parallel query (group_by, join, a lazy collect). Found by its "
        "worker threads' names, polars-0, polars-1..., in /proc/self/task/*/comm."
    )
    fixes = ("run polars queries in the workers, or fork them before the first parallel query",)

    def detect(self, census: _threads.Census | None) -> Hazard | None:
        if "polars" not in sys.modules or (census is not None and not census.native):
            return None
        threads = pool_threads(census)
        if not threads:
            return None
        return self.hazard(
            f"{threads} polars-N worker thread(s) are alive: a parallel query ran; the same "
            "query in a forked child hangs"
        )


POOL = Polars()
