"""Exceptions of the trainer, in a module of their own so every other module can import them."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid training config (one clear line)."""
