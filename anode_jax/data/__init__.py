"""Data pipeline: digits (scikit-learn), CIFAR-10/100 (local official layouts or tfds).

>>> from anode_jax.data import load_dataset
>>> ds = load_dataset("digits")
>>> ds.train_images.shape, ds.test_images.shape
((1437, 8, 8, 1), (360, 8, 8, 1))
"""

from __future__ import annotations

from anode_jax.data.augment import normalize, preprocess, random_crop_flip
from anode_jax.data.base import Dataset
from anode_jax.data.cifar import (
    CIFAR_MEAN,
    CIFAR_STD,
    expected_layouts,
    load_cifar_local,
    load_cifar_tfds,
    resolve_layout,
)
from anode_jax.data.digits import load_digits
from anode_jax.data.errors import DataError
from anode_jax.data.pipeline import TrainOrder, epoch_permutation, eval_batches, pad_batch
from anode_jax.data.safe_pickle import UnsafePickleError, safe_load, safe_loads

DATASET_NAMES = ("digits", "cifar10", "cifar100")
#: Image shape (H, W, C) of each dataset.
IMAGE_SHAPES = {"digits": (8, 8, 1), "cifar10": (32, 32, 3), "cifar100": (32, 32, 3)}
#: Images in each dataset's full test split (local copies may hold fewer, never more).
TEST_SPLIT_SIZES = {"digits": 360, "cifar10": 10_000, "cifar100": 10_000}

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATASET_NAMES",
    "IMAGE_SHAPES",
    "TEST_SPLIT_SIZES",
    "DataError",
    "Dataset",
    "TrainOrder",
    "UnsafePickleError",
    "epoch_permutation",
    "eval_batches",
    "expected_layouts",
    "load_cifar_local",
    "load_cifar_tfds",
    "load_dataset",
    "load_digits",
    "normalize",
    "pad_batch",
    "preprocess",
    "random_crop_flip",
    "resolve_layout",
    "safe_load",
    "safe_loads",
]


def load_dataset(name: str, data_dir: str = "", train_size: int = 0, test_size: int = 0) -> Dataset:
    """Load `name` into host memory; keep the first `train_size`/`test_size` (0 = all).

    `data_dir` (CIFAR only): a local copy in an official layout; empty means
    tensorflow-datasets. Raises `DataError` with a one-line message on failure.
    """
    if name not in DATASET_NAMES:
        raise DataError(f"unknown dataset '{name}'; valid: {', '.join(DATASET_NAMES)}")
    if name == "digits":
        ds = load_digits()
    elif data_dir:
        ds = load_cifar_local(name, data_dir)
    else:
        ds = load_cifar_tfds(name)
    for what, have in (("train", ds.num_train), ("test", ds.num_test)):
        if have == 0:
            raise DataError(f"{ds.source}: the {what} split is empty (0 images)")
    for what, size, have in (("train", train_size, ds.num_train), ("test", test_size, ds.num_test)):
        if size > have:
            raise DataError(
                f"data.{what}_size={size} but {ds.source} has only {have} {what} examples"
            )
    return ds.subset(train_size, test_size)
