"""``python -m tokguard``: the same command as the ``tokguard`` script."""

from __future__ import annotations

from .cli import run

if __name__ == "__main__":
    run()
