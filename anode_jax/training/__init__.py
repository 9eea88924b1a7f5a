"""Training: config validation, jit-compiled steps, orbax checkpoints, metrics, plots.

Entry points: :func:`get_config` (the configs of ``configs/*.py``), :func:`train_and_evaluate` (what ``train.py`` calls), :func:`evaluate`
(``train.py --eval_only``) and :func:`restore` (a checkpoint, its model and data, for analysis).
"""

from anode_jax.training.config_validation import validate_config
from anode_jax.training.configs import CONFIG_NAMES, get_config
from anode_jax.training.defaults import METHODS, base_config
from anode_jax.training.errors import ConfigError
from anode_jax.training.loop import Restored, TrainingError, evaluate, restore, train_and_evaluate
from anode_jax.training.train_state import (
    TrainState,
    build_model,
    create_train_state,
    make_lr_schedule,
    make_optimizer,
    param_count,
)

__all__ = [
    "CONFIG_NAMES",
    "ConfigError",
    "METHODS",
    "Restored",
    "TrainState",
    "TrainingError",
    "base_config",
    "build_model",
    "create_train_state",
    "evaluate",
    "get_config",
    "make_lr_schedule",
    "make_optimizer",
    "param_count",
    "restore",
    "train_and_evaluate",
    "validate_config",
]
