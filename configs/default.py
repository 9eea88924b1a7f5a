"""Offline default: the `small` ANODE network on scikit-learn's 8x8 digits.

    python train.py --config=configs/default.py --workdir=runs/default

A thin wrapper: the config lives in the package (`anode_jax.training.get_config("default")`),
so notebooks and scripts outside a checkout build the same one.
"""

from anode_jax.training import get_config as _get_config


def get_config(arg=None):
    return _get_config("default", arg or None)
