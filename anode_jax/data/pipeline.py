"""Deterministic, resumable batch order.

The training order of epoch `e` is a permutation drawn from `(seed, e)` alone, and
global step `s` reads batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`.
A run restored at step `s` therefore continues at exactly the batch it would have
read. Incomplete final batches are dropped in training (a fresh permutation each
epoch means every example is still seen); evaluation pads the last batch and masks it.
"""

from __future__ import annotations

import functools

import numpy as np


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**32, epoch]))
    return rng.permutation(num_examples)


class TrainOrder:
    """Maps a global step to the example indices of its batch."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if batch_size > num_examples:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {num_examples} training examples"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = num_examples // batch_size

    @functools.lru_cache(maxsize=2)  # noqa: B019 -- one order per run; it lives as long as the run
    def _perm(self, epoch: int) -> np.ndarray:
        return epoch_permutation(self.seed, epoch, self.num_examples)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of global `step`."""
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int) -> np.ndarray:
        epoch, i = self.position(step)
        return self._perm(epoch)[i * self.batch_size : (i + 1) * self.batch_size]


def eval_batches(num_examples: int, batch_size: int):
    """Yield (start, stop) of consecutive eval batches; the last may be short."""
    for start in range(0, num_examples, batch_size):
        yield start, min(start + batch_size, num_examples)


def pad_batch(images: np.ndarray, labels: np.ndarray, batch_size: int):
    """Pad a short batch to `batch_size`; returns (images, labels, mask)."""
    n = images.shape[0]
    mask = np.zeros((batch_size,), np.float32)
    mask[:n] = 1.0
    if n == batch_size:
        return images, labels, mask
    pad = batch_size - n
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
    return images, labels, mask
