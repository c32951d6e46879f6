"""The model every test server loads at import, as a preloading app does (hang-table row 8).

The CrossEncoder's path comes from TOKGUARD_TEST_MODEL (the tests build it in a temp
dir). The warm-up ``predict`` runs in whichever process imports this module: with
``gunicorn --preload`` that is the master, so torch's OpenMP pool starts before the fork.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
from typing import Any

PAIRS = [("the parent forks", "the child hangs"), ("a tiny bert", "predicts quickly")]


def _load_lab() -> Any:
    """tokguard's lab, through its standalone loader: `import tokguard._lab` installs the guard."""
    spec = importlib.util.find_spec("tokguard")  # finds the package without running it
    assert spec is not None
    assert spec.submodule_search_locations
    directory = next(iter(spec.submodule_search_locations))
    return runpy.run_path(os.path.join(directory, "_lab", "standalone.py"))["load"]()


lab = _load_lab()


def load() -> Any:
    model = lab.load_cross_encoder(os.environ["TOKGUARD_TEST_MODEL"])
    model.predict(PAIRS, show_progress_bar=False)  # the warm-up: starts torch's pool
    return model


def score(model: Any, query: str) -> float:
    return float(model.predict([(query, "a worker answers")], show_progress_bar=False)[0])
