"""The command line (``proxycore ...``): :func:`main`."""

from .commands import main

__all__ = ["main"]
