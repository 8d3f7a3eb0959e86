"""One process on one device: the interface's defaults (see base.py)."""
from __future__ import annotations

from .base import Strategy


class SingleProcess(Strategy):
    name = "none"
