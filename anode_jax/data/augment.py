"""Jittable preprocessing: random crop with zero padding, horizontal flip, normalization.

All functions are pure JAX and take an explicit PRNG key; the training step derives
it as `jax.random.fold_in(rng, step)`, so the augmentation of every step is a
function of (seed, step) alone: deterministic, independent of how the batch is
sharded, and reproduced exactly after a resume.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def random_crop_flip(
    key: jax.Array, images: jax.Array, *, pad: int = 4, flip: bool = True
) -> jax.Array:
    """Pad each NHWC image by `pad` zeros, crop back at a random offset, maybe flip.

    Equivalent to torchvision's `RandomCrop(size, padding=pad)` followed by
    `RandomHorizontalFlip()`, applied independently per image.
    """
    b, h, w, c = images.shape
    k_crop, k_flip = jax.random.split(key)
    if pad > 0:
        offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

        def crop(img, off):
            return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        do_flip = jax.random.bernoulli(k_flip, 0.5, (b,))
        images = jnp.where(do_flip[:, None, None, None], images[:, :, ::-1, :], images)
    return images


def normalize(
    images: jax.Array, *, pixel_scale: float, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
    """Raw pixels -> float32 `(x * pixel_scale - mean) / std` (per channel)."""
    x = images.astype(jnp.float32) * jnp.float32(pixel_scale)
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (x - mean) / std


def preprocess(
    images: jax.Array,
    *,
    key: jax.Array | None,
    pixel_scale: float,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pad: int = 0,
    flip: bool = False,
) -> jax.Array:
    """Scale to [0, 1], augment (when `key` is given), then normalize.

    Augmentation pads with zeros in [0, 1] pixel space before normalization, as the
    reference PyTorch pipeline (RandomCrop before Normalize) does.
    """
    x = images.astype(jnp.float32) * jnp.float32(pixel_scale)
    if key is not None and (crop_pad > 0 or flip):
        x = random_crop_flip(key, x, pad=crop_pad, flip=flip)
    return normalize(x, pixel_scale=1.0, mean=mean, std=std)
