"""The same WSGI app with `import tokguard` as its first line, as the quickstart says."""

import tokguard  # noqa: F401, I001  - first, before anything imports tokenizers or torch

from server_wsgi import app

__all__ = ["app"]
