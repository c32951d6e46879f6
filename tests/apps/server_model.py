"""The model every test server loads at import, as a preloading app does (hang-table row 8).

The CrossEncoder's path comes from TOKGUARD_TEST_MODEL (the tests build it in a temp
dir). The warm-up ``predict`` runs in whichever process imports this module: with
``gunicorn --preload`` that is the master, so torch's OpenMP pool starts before the fork.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

PAIRS = [("the parent forks", "the child hangs"), ("a tiny bert", "predicts quickly")]


def _lab() -> Any:
    """tokguard's _lab module, loaded by path: `import tokguard._lab` would install the guard."""
    spec = importlib.util.find_spec("tokguard")  # finds the package without running it
    assert spec is not None
    assert spec.submodule_search_locations
    path = os.path.join(next(iter(spec.submodule_search_locations)), "_lab.py")
    lab_spec = importlib.util.spec_from_file_location("_tokguard_test_lab", path)
    assert lab_spec is not None
    assert lab_spec.loader is not None
    module = importlib.util.module_from_spec(lab_spec)
    sys.modules[lab_spec.name] = module
    lab_spec.loader.exec_module(module)
    return module


def load() -> Any:
    model = _lab().load_cross_encoder(os.environ["TOKGUARD_TEST_MODEL"])
    model.predict(PAIRS, show_progress_bar=False)  # the warm-up: starts torch's pool
    return model


def score(model: Any, query: str) -> float:
    return float(model.predict([(query, "a worker answers")], show_progress_bar=False)[0])
