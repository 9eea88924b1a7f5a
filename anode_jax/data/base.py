"""In-memory dataset container shared by all sources."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled image dataset held in host memory.

    Images are stored raw (`uint8`, NHWC); `pixel_scale` maps them to `[0, 1]`
    and `mean`/`std` (per channel, in `[0, 1]` units) normalize them. Scaling,
    augmentation and normalization happen inside the jitted step (see
    `anode_jax.data.augment`), so only bytes travel host -> device.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    pixel_scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    class_names: tuple[str, ...] = ()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_images.shape[0])

    def subset(self, train_size: int = 0, test_size: int = 0) -> Dataset:
        """First `train_size` / `test_size` examples (0 keeps everything)."""
        tr = slice(None) if not train_size else slice(0, train_size)
        te = slice(None) if not test_size else slice(0, test_size)
        return dataclasses.replace(
            self,
            train_images=self.train_images[tr],
            train_labels=self.train_labels[tr],
            test_images=self.test_images[te],
            test_labels=self.test_labels[te],
        )

    def describe(self) -> str:
        h, w, c = self.image_shape
        return (
            f"{self.name}: {self.num_train} train / {self.num_test} test images of "
            f"{h}x{w}x{c}, {self.num_classes} classes, from {self.source}"
        )
