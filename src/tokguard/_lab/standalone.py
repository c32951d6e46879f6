"""Import the lab without running ``tokguard/__init__.py``: the one way to do it.

Every process that must stay unguarded and still needs the lab (the demo's unguarded
scenario runs, the tests' baselines, test apps served by gunicorn, the pytest process
itself) cannot ``import tokguard._lab``: that runs ``tokguard/__init__.py`` first, and it
installs the guard. So this file is run by path, and nothing else is::

    import runpy
    lab = runpy.run_path("/path/to/tokguard/_lab/standalone.py")["load"]()
    lab.watchdog.fork_and_watch(...); lab.train_tokenizer(); lab.scenarios (after load)

``load()`` imports the lab package under the name ``_tokguard_lab`` (the standard
``importlib`` recipe for a package at a path), so its modules import each other as
usual and ``import _tokguard_lab.scenarios`` works afterwards. Stdlib only, no relative
imports: this file is never imported as part of a package.

Run as a script, it is the unguarded scenario runner (``python standalone.py ROW ...``):
see ``scenarios``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

NAME = "_tokguard_lab"
DIRECTORY = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(DIRECTORY, "standalone.py")


def load() -> ModuleType:
    """The lab package, imported as ``_tokguard_lab`` (once per process)."""
    loaded = sys.modules.get(NAME)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(
        NAME, os.path.join(DIRECTORY, "__init__.py"), submodule_search_locations=[DIRECTORY]
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module  # before running it: its relative imports look it up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[NAME]
        raise
    return module


def main() -> int:
    """``python standalone.py ROW ...``: the scenario runner, with tokguard not imported."""
    if sys.path and os.path.abspath(sys.path[0] or ".") == DIRECTORY:
        del sys.path[0]  # run as a script: the lab's files must not shadow top-level modules
    load()
    scenarios = importlib.import_module(NAME + ".scenarios")
    result: int = scenarios.main()
    return result


if __name__ == "__main__":
    sys.exit(main())
