"""Workers forked by the multiprocessing forkserver after it preloaded a warmed model.

``python master_forkserver.py --tasks N --timeout S``: a forkserver Pool of 2 runs N tasks,
each reporting its worker's settings and scoring with the preloaded model. Prints one JSON
line: tasks answered within the deadline, and the settings seen. A hung pool is terminated.
PYTHONPATH must hold this directory: the 3.11 forkserver does not get the parent's sys.path.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import sys
from typing import Any


def settings(i: int) -> dict[str, Any]:
    import master_forkserver_model as preloaded  # imported in the forkserver already
    import server_model
    import torch

    getenv = ctypes.CDLL(None).getenv
    getenv.restype = ctypes.c_char_p
    raw = getenv(b"TOKENIZERS_PARALLELISM")
    result = {
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
        "import_threads": preloaded.IMPORT_THREADS,
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        "tokenizers_parallelism_c": None if raw is None else raw.decode(),
    }
    if preloaded.MODEL is not None:
        result["score"] = server_model.score(preloaded.MODEL, f"query {i}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    main_master = None
    if os.environ.get("TOKGUARD_TEST_GUARD") == "1":
        import tokguard

        main_master = tokguard.master_mode().active  # the parent is no master
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["master_forkserver_model"])
    pool = context.Pool(2)
    answered: list[dict[str, Any]] = []
    try:
        pending = pool.map_async(settings, range(args.tasks), chunksize=1)
        answered = pending.get(timeout=args.timeout)
    except multiprocessing.TimeoutError:
        pass
    finally:
        pool.terminate()
        pool.join()
    result = {"answered": len(answered), "settings": answered, "main_master": main_master}
    print(json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
