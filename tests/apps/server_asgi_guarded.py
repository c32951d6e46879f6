"""The same ASGI app with `import tokguard` as its first line."""

import tokguard  # noqa: F401, I001  - first, before anything imports tokenizers or torch

from server_asgi import app

__all__ = ["app"]
