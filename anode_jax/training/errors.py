"""Exceptions of the trainer, in a module of their own so every other module can import them."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid training config (one clear line)."""


class TrainingError(RuntimeError):
    """Training cannot continue (diverged, no checkpoint to evaluate, mismatched resume, a
    busy workdir, unreadable checkpoints, a failed write): one clear line."""
