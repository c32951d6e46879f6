"""Preloaded in the multiprocessing forkserver: warms a CrossEncoder there at import.

TOKGUARD_TEST_GUARD=1 puts ``import tokguard`` first. Every worker the forkserver forks
inherits the warmed model (and, without tokguard, torch's dead OpenMP pool).
"""

from __future__ import annotations

import os

if os.environ.get("TOKGUARD_TEST_GUARD") == "1":
    import tokguard  # noqa: F401  - first, before anything imports tokenizers or torch

import torch

IMPORT_THREADS = torch.get_num_threads()  # in the forkserver process
MODEL = None
if os.environ.get("TOKGUARD_TEST_MODEL"):
    import server_model

    MODEL = server_model.load()
