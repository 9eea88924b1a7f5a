"""The one base config every config file starts from (big_vision style).

The named configs (:mod:`anode_jax.training.configs`, wrapped by ``configs/*.py``) call
:func:`base_config` and override a few fields. The key set of :func:`base_config` is also
the schema that :func:`anode_jax.training.config_validation.validate_config` checks
against, so a config can never carry a key the trainer silently ignores.
"""

from __future__ import annotations

import ml_collections

from anode_jax.training.errors import ConfigError

METHODS = ("baseline", "backsolve", "anode", "anodev2")
CIFAR_MODELS = ("resnet", "sqnxt", "resnet4", "resnet10", "alexnet")

# method -> (block type passed to create_model, default adjoint)
METHOD_BLOCKS = {
    "baseline": ("residual", "anode"),
    "backsolve": ("ode", "backsolve"),
    "anode": ("ode", "anode"),
    "anodev2": ("coupled", "anode"),
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 256  # global batch, split over all devices
    c.eval_batch_size = 128
    c.num_epochs = 350
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 2  # how many recent checkpoints orbax keeps
    c.log_every_steps = 50  # train metrics line cadence (also at epoch ends, checkpoints)
    c.eval_every_epochs = 1
    c.progress_bar = True
    c.plots = True
    c.tensorboard = True  # TensorBoard event files in the workdir (same steps as metrics.jsonl)
    c.distributed = False  # call jax.distributed.initialize() (multi-host GPU/TPU)
    c.num_devices = 0  # 0 = all devices of jax.devices(); else the first N

    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10"  # digits | cifar10 | cifar100
    c.data.dir = ""  # local folder in an official layout; "" = default source
    c.data.train_size = 0  # 0 = all, else the first N
    c.data.test_size = 0
    c.data.augment = True  # random crop (zero padding) + horizontal flip
    c.data.crop_padding = 4
    c.data.flip = True

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet"
    c.model.method = "anode"  # baseline | backsolve | anode | anodev2
    c.model.num_steps = 2  # Nt: solver steps per ODE block
    c.model.solver = "euler"
    c.model.adjoint = "anode"  # "backsolve" iff method == backsolve
    c.model.q = "rda"  # ANODEv2 parameter-evolution network (method anodev2)
    c.model.norm = "batch"
    c.model.width = 1.0

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"  # sgd | adamw
    c.optim.learning_rate = 0.1
    c.optim.momentum = 0.9  # sgd
    c.optim.nesterov = False  # sgd
    c.optim.b1 = 0.9  # adamw
    c.optim.b2 = 0.999  # adamw
    c.optim.weight_decay = 5e-4  # sgd: L2 added to the gradient (PyTorch style); adamw: decoupled
    c.optim.schedule = "step"  # step | cosine | constant
    c.optim.lr_milestones = (150, 250)  # epochs where the step schedule multiplies lr by lr_gamma
    c.optim.lr_gamma = 0.1
    c.optim.warmup_epochs = 0.0
    c.optim.grad_clip_norm = 0.0  # 0 = off
    return c


def parse_model_method(arg: str, *, valid_models=CIFAR_MODELS) -> tuple[str, str]:
    """``"resnet4-anode"`` -> ``("resnet4", "anode")``, with a clear error otherwise."""
    model, sep, method = (arg or "").strip().partition("-")
    if not sep or model not in valid_models or method not in METHODS:
        raise ConfigError(
            f"config argument '{arg}' is not MODEL-METHOD with MODEL in {{{', '.join(valid_models)}}} "
            f"and METHOD in {{{', '.join(METHODS)}}} (e.g. 'resnet4-anode')"
        )
    return model, method


def apply_method(c: ml_collections.ConfigDict, method: str) -> None:
    c.model.method = method
    c.model.adjoint = METHOD_BLOCKS[method][1]
