"""The lab: tiny local models, the watchdog, the hang scenarios and ``tokguard demo``.

Everything that reproduces a hang lives here, once: the demo runs the scenarios, the tests
run the same scenarios, and ``tokguard check`` and the tests' fresh interpreters use the
same watchdog.

Why this package must import nothing from tokguard outside it (``demo`` excepted, it is
the command): a baseline that shows a hang *without* tokguard must not run
``tokguard/__init__.py``, which installs the guard, and ``import tokguard._lab`` would run
it first. ``standalone.load()`` imports this package under its own name instead; relative
imports between its modules work the same both ways. ``models`` and ``watchdog`` are
stdlib-only at import (tokenizers and torch are imported inside functions), so importing
the package costs nothing that matters.
"""

from __future__ import annotations

from . import models, watchdog
from .models import SPECIAL_TOKENS, build_cross_encoder, corpus, load_cross_encoder, train_tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "build_cross_encoder",
    "corpus",
    "load_cross_encoder",
    "models",
    "train_tokenizer",
    "watchdog",
]
