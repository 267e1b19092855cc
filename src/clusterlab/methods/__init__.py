"""Every method, by the name `--method` takes."""
from __future__ import annotations

from .base import Batch, DataInfo, Method, Progress
from .embedul import EmbedUL
from .npid import NPID
from .scan import SCAN
from .scan_selflabel import SCANSelfLabel
from .sela import SeLa
from .selfclassifier import SelfClassifier
from .superand import SuperAND
from .swav import SwAV
from .unmix import UnMix

METHODS: dict[str, type[Method]] = {
    "swav": SwAV,
    "unmix": UnMix,
    "npid": NPID,
    "superand": SuperAND,
    "sela": SeLa,
    "selfclassifier": SelfClassifier,
    "embedul": EmbedUL,
    "scan": SCAN,
    "scan_selflabel": SCANSelfLabel,
}

__all__ = ["METHODS", "Batch", "DataInfo", "Method", "Progress"]
