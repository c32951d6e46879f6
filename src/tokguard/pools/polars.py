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

import os
import sys

from . import Pool

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .. import _threads
    from .._report import Hazard

_TASKS = "/proc/self/task"
_PREFIX = b"polars-"


def pool_threads() -> int:
    """How many ``polars-N`` worker threads are alive now (0 where /proc cannot say)."""
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return 0
    count = 0
    for tid in tids:
        try:
            fd = os.open(f"{_TASKS}/{tid}/comm", os.O_RDONLY)
        except OSError:
            continue  # the thread ended meanwhile
        try:
            name = os.read(fd, 64).strip()
        finally:
            os.close(fd)
        if name.startswith(_PREFIX) and name[len(_PREFIX) :].isdigit():
            count += 1
    return count


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
        if "polars" not in sys.modules:
            return None
        threads = pool_threads()
        if not threads:
            return None
        return self.hazard(
            f"{threads} polars-N worker thread(s) are alive: a parallel query ran; the same "
            "query in a forked child hangs"
        )


POOL = Polars()
