"""Training: configs, validation, jit-compiled steps, orbax checkpoints, metrics, plots.

Entry points: `get_config` (the configs of `configs/*.py`), `train_and_evaluate` (what
`train.py` calls), `evaluate` (`train.py --eval_only`) and `restore` (a checkpoint, its
model and data, for analysis). The parts they are built from (`compile_steps`,
`init_state`, `Checkpointer`, `RecordWriter`, the sharding helpers, ...) are exported here
too, so that benchmarks, notebooks and tests import nothing from the modules themselves.
"""

from anode_jax.training.checkpoints import (
    DAMAGED_DIRNAME,
    Checkpointer,
    CheckpointReadError,
    CheckpointWriteError,
)
from anode_jax.training.config_validation import (
    FIELDS,
    check_distributed_environment,
    check_known_keys,
    check_override,
    divergence_hints,
    flat_config,
    validate_config,
)
from anode_jax.training.configs import (
    CIFAR_MODELS,
    CONFIG_NAMES,
    METHOD_SPECS,
    METHODS,
    apply_method,
    base_config,
    block_type,
    get_config,
    parse_model_method,
)
from anode_jax.training.errors import ConfigError, TrainingError
from anode_jax.training.loop import Restored, evaluate, restore, train_and_evaluate
from anode_jax.training.metrics import (
    MetricsLog,
    NonFiniteLoss,
    RecordWriter,
    summarize,
    train_record,
)
from anode_jax.training.plots import plot_curves
from anode_jax.training.sharding import batch_sharded, make_mesh, put_batch, replicated
from anode_jax.training.steps import compile_steps, make_eval_step, make_train_step
from anode_jax.training.tensorboard import (
    SCALARS,
    TensorBoardWriter,
    event_files,
    read_scalars,
    truncate_events_after,
)
from anode_jax.training.train_state import (
    TrainState,
    build_model,
    create_train_state,
    init_state,
    make_lr_schedule,
    make_optimizer,
    model_kwargs,
    param_count,
)
from anode_jax.training.workdir import WorkdirError, check_workdir
from anode_jax.training.workdir_lock import WorkdirBusyError, WorkdirLock

__all__ = [
    "CIFAR_MODELS",
    "CONFIG_NAMES",
    "DAMAGED_DIRNAME",
    "FIELDS",
    "METHODS",
    "METHOD_SPECS",
    "SCALARS",
    "CheckpointReadError",
    "CheckpointWriteError",
    "Checkpointer",
    "ConfigError",
    "MetricsLog",
    "NonFiniteLoss",
    "RecordWriter",
    "Restored",
    "TensorBoardWriter",
    "TrainState",
    "TrainingError",
    "WorkdirBusyError",
    "WorkdirError",
    "WorkdirLock",
    "apply_method",
    "base_config",
    "batch_sharded",
    "block_type",
    "build_model",
    "check_distributed_environment",
    "check_known_keys",
    "check_override",
    "check_workdir",
    "compile_steps",
    "create_train_state",
    "divergence_hints",
    "evaluate",
    "event_files",
    "flat_config",
    "get_config",
    "init_state",
    "make_eval_step",
    "make_lr_schedule",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "model_kwargs",
    "param_count",
    "parse_model_method",
    "plot_curves",
    "put_batch",
    "read_scalars",
    "replicated",
    "restore",
    "summarize",
    "train_and_evaluate",
    "train_record",
    "truncate_events_after",
    "validate_config",
]
