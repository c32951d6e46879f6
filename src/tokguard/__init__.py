"""tokguard: forks that do not hang in processes using tokenizers, transformers and torch.

``import tokguard`` as the first line of an application does two things, on purpose, as an
import side effect (documented in docs/how-it-works.md):

1. sets ``TOKENIZERS_PARALLELISM=false`` where the process has no value for it (a value
   the user set, any value, is kept);
2. installs the fork guard once per process: fork hooks, an ``os.fork`` wrapper, and
   instrumentation of tokenizers and torch when (or if already) they are imported;
3. in a preforking master (gunicorn ``--preload``, celery prefork, the forkserver, pytest
   ``--forked``), keeps the pools cold and restores the settings in each forked worker
   (master mode, docs/full-speed-workers.md; ``TOKGUARD_MASTER=off`` turns it off).

It imports nothing heavy: the import budget is a few milliseconds, because the pytest
plugin loads this package in every test session of every project that installs it.

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's package, and warns that it
cannot when the package was imported before pytest started ("Module already imported so
cannot be rewritten; tokguard", an error under ``-W error``), as it is in a program that
imports tokguard first and then runs pytest, or under ``tokguard run -- pytest``.
"""

import os
import sys

from . import _config, _env, _fork, _instrument, _master
from ._config import configure, current_mode
from ._master import master_mode
from .pools import hazards

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._coldstart import single_threaded
    from ._report import ForkReport, Hazard, UnsafeForkError, UnsafeForkWarning, subscribe
    from .lazy import LazyModel, lazy_model

# Public names whose modules load on first access, so that a process pays at ``import
# tokguard`` only for the guard itself: lazy_model needs threading and weakref, and the
# report module is needed only once a fork is found unsafe (or a test asks for its names).
_LAZY_NAMES = {
    "ForkReport": "tokguard._report",
    "Hazard": "tokguard._report",
    "UnsafeForkError": "tokguard._report",
    "UnsafeForkWarning": "tokguard._report",
    "subscribe": "tokguard._report",
    "LazyModel": "tokguard.lazy",
    "lazy_model": "tokguard.lazy",
    "single_threaded": "tokguard._coldstart",
}

__all__ = [
    "ForkReport",
    "Hazard",
    "LazyModel",
    "UnsafeForkError",
    "UnsafeForkWarning",
    "__version__",
    "configure",
    "current_mode",
    "hazards",
    "lazy_model",
    "master_mode",
    "reset",
    "single_threaded",
    "subscribe",
]


def reset() -> None:
    """Back to the state right after import: mode from TOKGUARD_MODE, warnings not yet given.

    For tests. What the pools did is not forgotten: their threads are still there.
    """
    from . import _report

    _config.load_from_env()
    _report.forget_warnings()


def __getattr__(name: str) -> "Any":
    # Resolved on first use: importlib.metadata alone costs more than all of tokguard.
    if name in _LAZY_NAMES:
        import importlib

        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
        globals()[name] = value
        return value
    if name == "__version__":
        from importlib.metadata import version

        value = version("tokguard")
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokguard' has no attribute {name!r}")


def _start() -> None:
    """The import-time work; a failure is reported, never raised (it would stop a server)."""
    # One step's failure must not cost the others (a guard without hooks protects nothing).
    # Master mode last: it saves the settings the process has with tokguard's default applied.
    steps = (
        _config.load_from_env,
        _env.apply_default,
        _fork.install,
        _instrument.install,
        _master.install,
        _watch_uwsgi,
    )
    for step in steps:
        try:
            step()
        except Exception as exc:  # pragma: no cover - defensive
            from ._report import internal_error

            internal_error(f"import tokguard ({step.__module__}.{step.__name__})", exc)


def _watch_uwsgi() -> None:
    """uWSGI's check, loaded only where uWSGI runs this interpreter: its module or its binary."""
    try:
        embedded = os.path.basename(os.readlink("/proc/self/exe")).startswith("uwsgi")
    except OSError:
        embedded = False
    if embedded or "uwsgi" in sys.modules:
        from . import _uwsgi

        _uwsgi.watch()


_start()
