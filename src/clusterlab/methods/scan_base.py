"""What SCAN's two stages (methods/scan.py, methods/scan_selflabel.py) share; this module defines no method."""
from __future__ import annotations

from ..config import non_negative_int
from ..errors import ConfigError


def add_strong_augment_args(group) -> None:
    """The flags of the strong augmentation (data/randaugment.py), upstream's strategy "ours"."""
    group.add_argument("--strong_ops", "--num_strong_augs", type=non_negative_int, default=4,
                       help="RandAugment-style operations per image")
    group.add_argument("--cutout", type=non_negative_int, default=16,
                       help="largest Cutout side (upstream's cutout length; 0: no Cutout)")


def require_in_memory(train_set, method: str) -> None:
    """scan fetches each anchor's neighbour by dataset position, and both stages augment whole uint8 images
    themselves (strong and weak views); the image-file loader gives neither (its workers cut the method's crops)."""
    if not train_set.in_memory:
        raise ConfigError(f"--method {method} needs a dataset held in memory (cifar10, cifar100, cifar100_20, stl10, "
                          f"fashion_mnist, digits); {train_set.name!r} is read from image files")
