"""The named training configs, reachable from the installed package.

``configs/*.py`` (what ``train.py --config=...`` loads) are thin wrappers over
:func:`get_config`, so a notebook or script without a repository checkout builds exactly
the same config::

    from anode_jax.training import get_config

    get_config("default")                  # == configs/default.py
    get_config("cifar10", "resnet4-anode")  # == configs/cifar10.py:resnet4-anode
    get_config("cifar10:resnet4-anode")     # the same, in the command-line spelling

``default``: the `small` ANODE network on scikit-learn's 8x8 digits (offline, no download:
1437 train / 360 test images, fixed-seed stratified split), AdamW 3e-3, cosine schedule.

``cifar10`` / ``cifar100``, argument ``MODEL-METHOD`` (default ``resnet-anode``), MODEL in
{resnet, sqnxt, resnet4, resnet10, alexnet}, METHOD in {baseline (plain residual blocks),
backsolve (Neural ODE adjoint), anode, anodev2 (coupled ODE, q=rda)}. The ANODE paper's
recipe (Gholami et al. 2019): SGD momentum 0.9, weight decay 5e-4, lr 0.1 divided by 10 at
epoch 150 and by 100 at 250, 350 epochs, batch 256 (eval 128), Nt = 2, random crop with
4-px padding + horizontal flip, normalization mean (0.4914, 0.4822, 0.4465) std (0.2023,
0.1994, 0.2010). Set ``config.data.dir`` to a local copy in an official layout (e.g.
``../shared/data/cifar10``; for CIFAR-100 the folder holding ``cifar-100-python/`` or
``cifar-100-binary/``) to skip tensorflow-datasets.
"""

from __future__ import annotations

import ml_collections

from anode_jax.training.defaults import apply_method, base_config, parse_model_method
from anode_jax.training.errors import ConfigError

#: Config names accepted by :func:`get_config` (one ``configs/<name>.py`` each).
CONFIG_NAMES = ("default", "cifar10", "cifar100")

#: MODEL-METHOD used by the CIFAR configs when no argument is given.
DEFAULT_CIFAR_ARG = "resnet-anode"


def _default() -> ml_collections.ConfigDict:
    c = base_config()
    c.data.name = "digits"
    c.data.augment = False
    c.model.name = "small"
    apply_method(c, "anode")
    c.batch_size = 64
    c.eval_batch_size = 360
    c.num_epochs = 20
    c.checkpoint_every_steps = 200
    c.log_every_steps = 22
    c.optim.name = "adamw"
    c.optim.learning_rate = 3e-3
    c.optim.weight_decay = 1e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 1.0
    return c


def _cifar(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
    model, method = parse_model_method(arg if arg else DEFAULT_CIFAR_ARG)
    c = base_config()
    c.data.name = dataset
    c.model.name = model
    apply_method(c, method)
    return c


def get_config(name: str = "default", arg: str | None = None) -> ml_collections.ConfigDict:
    """The config ``configs/<name>.py:<arg>`` builds; ``name`` may also be ``"name:arg"``."""
    if arg is None and ":" in name:
        name, arg = name.split(":", 1)
    if name == "default":
        if arg:
            raise ConfigError(f"config 'default' takes no argument, got {arg!r}")
        return _default()
    if name in ("cifar10", "cifar100"):
        return _cifar(name, arg)
    raise ConfigError(f"unknown config {name!r}; choose one of: {', '.join(CONFIG_NAMES)}")
