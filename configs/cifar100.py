"""CIFAR-100 with the ANODE paper's recipe; config argument MODEL-METHOD.

    python train.py --config=configs/cifar100.py:resnet4-anode --workdir=runs/cifar100_resnet4_anode

A thin wrapper over `anode_jax.training.get_config("cifar100", "MODEL-METHOD")`; the recipe,
the models and methods are documented in `anode_jax/training/configs.py`.
"""

from anode_jax.training import get_config as _get_config


def get_config(arg=None):
    return _get_config("cifar100", arg or None)
