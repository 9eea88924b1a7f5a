"""scikit-learn's 8x8 handwritten digits (ships with scikit-learn, no download)."""

from __future__ import annotations

import numpy as np

from anode_jax.data.base import Dataset

# Fixed split: 1437 train / 360 test, stratified by class, independent of config.seed.
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    images = bunch.images.astype(np.uint8)[..., None]  # (1797, 8, 8, 1), values 0..16
    labels = bunch.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images,
        labels,
        test_size=DIGITS_TEST_SIZE,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    scaled = x_tr.astype(np.float64) / 16.0
    return Dataset(
        name="digits",
        train_images=np.ascontiguousarray(x_tr),
        train_labels=y_tr,
        test_images=np.ascontiguousarray(x_te),
        test_labels=y_te,
        num_classes=10,
        pixel_scale=1.0 / 16.0,
        mean=(float(scaled.mean()),),
        std=(float(scaled.std()),),
        source="sklearn.datasets.load_digits (stratified split, seed 0)",
        class_names=tuple(str(i) for i in range(10)),
    )
