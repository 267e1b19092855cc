"""Every method, by the name `--method` takes."""
from __future__ import annotations

from .base import Batch, DataInfo, Method, Progress
from .swav import SwAV

METHODS: dict[str, type[Method]] = {
    "swav": SwAV,
}

__all__ = ["METHODS", "Batch", "DataInfo", "Method", "Progress"]
