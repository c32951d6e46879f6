"""hf_xet's tokio runtime (threads ``hf-xet-0``, ``hf-xet-1``...), which huggingface_hub downloads
and uploads through.

Measured with a watchdog: hf_xet 1.0.0 to 1.1.5 start the runtime at ``import hf_xet``, and
a forked child's upload or download hangs, every fork; nothing in the child can restart the
runtime. From 1.1.6 on (1.8.0 measured too), the runtime starts at the first transfer or
hash, and a forked child gets a new one: its transfers work. Only a ``XetSession`` made
before the fork fails in the child, with hf_xet's own RuntimeError ("XetRuntime was created
in process ... but is being used in process ..."); huggingface_hub makes a new session there.

So the pool reports the runtime's threads only where the installed hf_xet cannot survive a
fork: reporting every process that has downloaded a model would cry wolf on most users.
"""

from __future__ import annotations

import sys

from . import Pool

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .. import _threads
    from .._report import Hazard

PREFIX = "hf-xet-"
FORK_SAFE_SINCE = (1, 1, 6)
"""The first hf_xet that gives a forked child a runtime of its own."""


def version() -> tuple[int, ...] | None:
    """The installed hf_xet's version, or None where its metadata cannot be read."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        text = distribution_version("hf-xet")
    except PackageNotFoundError:
        return None
    numbers = []
    for part in text.split(".")[:3]:
        digits = part[: len(part) - len(part.lstrip("0123456789"))]  # "0rc1" -> "0"
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers) or None


def _show(parts: tuple[int, ...]) -> str:
    return ".".join(map(str, parts))


class HfXetTokio(Pool):
    id = "hf-xet-tokio"
    found_by_threads = True
    title = "hf_xet runtime (tokio)"
    description = (
        "Started at import by hf_xet up to 1.1.5 (huggingface_hub's downloads); found by "
        "its threads' names, hf-xet-0, hf-xet-1..., in /proc/self/task/*/comm. Reported only "
        "for those releases: from 1.1.6 on a forked child gets a runtime of its own."
    )
    fixes = (
        f"upgrade hf_xet to {_show(FORK_SAFE_SINCE)} or later: it gives a forked child a "
        "runtime of its own",
    )

    def __init__(self) -> None:
        super().__init__()
        self._version: tuple[int, ...] | None = None
        self._version_read = False

    def installed(self) -> tuple[int, ...] | None:
        """hf_xet's version, read once (its metadata is read only where its threads run)."""
        if not self._version_read:
            self._version, self._version_read = version(), True
        return self._version

    def detect(self, census: _threads.Census | None) -> Hazard | None:
        if "hf_xet" not in sys.modules or (census is not None and not census.native):
            return None
        from .. import _threads

        threads = sum(
            name.startswith(PREFIX) and name[len(PREFIX) :].isdigit()
            for name in _threads.native_names(census)
        )
        installed = self.installed()
        if not threads or installed is None or installed >= FORK_SAFE_SINCE:
            return None
        return self.hazard(
            f"{threads} hf-xet-N runtime thread(s) are alive (hf_xet {_show(installed)} starts "
            "its runtime at import): a forked child's download or upload hangs"
        )

    def doctor_lines(self) -> list[str]:
        installed = self.installed()
        if installed is None:
            return []
        if installed >= FORK_SAFE_SINCE:
            return [
                f"hf_xet {_show(installed)} gives a forked child a runtime of its own: "
                "huggingface_hub's downloads work there."
            ]
        return [
            f"hf_xet {_show(installed)} starts its runtime at import, and a forked child's "
            f"download hangs: upgrade hf_xet to {_show(FORK_SAFE_SINCE)} or later."
        ]


POOL = HfXetTokio()
