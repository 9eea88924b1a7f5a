"""Every config fact in one place: the base config, the named configs, MODEL-METHOD parsing.

`configs/*.py` (what `train.py --config=...` loads) are thin wrappers over
`get_config`, so a notebook or script without a repository checkout builds exactly
the same config:

    from anode_jax.training import get_config

    get_config("default")                  # == configs/default.py
    get_config("cifar10", "resnet4-anode")  # == configs/cifar10.py:resnet4-anode
    get_config("cifar10:resnet4-anode")     # the same, in the command-line spelling

`base_config` is the one base every named config starts from (big_vision style); its key
set is also the schema `anode_jax.training.validate_config` checks
against, so a config can never carry a key the trainer silently ignores.

`default`: the `small` ANODE network on scikit-learn's 8x8 digits (offline, no download:
1437 train / 360 test images, fixed-seed stratified split), AdamW 3e-3, cosine schedule.

`cifar10` / `cifar100`, argument `MODEL-METHOD` (default `resnet-anode`), MODEL in
{resnet, sqnxt, resnet4, resnet10, alexnet}, METHOD in `METHODS`. The ANODE paper's
recipe (Gholami et al. 2019): SGD momentum 0.9, weight decay 5e-4, lr 0.1 divided by 10 at
epoch 150 and by 100 at 250, 350 epochs, batch 256 (eval 128), Nt = 2, random crop with
4-px padding + horizontal flip, normalization mean (0.4914, 0.4822, 0.4465) std (0.2023,
0.1994, 0.2010). Set `config.data.dir` to a local copy in an official layout (e.g.
`../shared/data/cifar10`; for CIFAR-100 the folder holding `cifar-100-python/` or
`cifar-100-binary/`) to skip tensorflow-datasets.

Two keys, two meanings: `model.method` is the *paper's network* (which block the model
stacks, and the gradient strategy the paper trained it with); `model.adjoint` is the
*gradient strategy* actually used (`anode_jax.ode.ADJOINTS`). The method `anode` (ODE
blocks, as in the ANODE paper) defaults to the adjoint `anode` (store each block's input,
recompute, backpropagate through the discrete solver), but may be trained with any exact
adjoint (`direct`, `checkpointed:K`, `reversible`).
"""

from __future__ import annotations

import ml_collections

from anode_jax.training.errors import ConfigError

#: The papers' methods, `model.method`: method -> (block type of
#: `anode_jax.models.create_model`, default `model.adjoint`, meaning).
METHOD_SPECS = {
    "baseline": ("residual", "anode", "plain residual blocks z + f(z) (the adjoint is unused)"),
    "backsolve": ("ode", "backsolve", "Neural ODE blocks with the reverse-time adjoint"),
    "anode": ("ode", "anode", "ODE blocks with ANODE's exact discrete gradients"),
    "anodev2": ("coupled", "anode", "ANODEv2 coupled weight ODE (q = rda)"),
}
METHODS = tuple(METHOD_SPECS)
#: method -> (block type, default adjoint); kept for code written against `defaults.py`.
METHOD_BLOCKS = {m: spec[:2] for m, spec in METHOD_SPECS.items()}
#: The MODEL part of a CIFAR config's MODEL-METHOD argument.
CIFAR_MODELS = ("resnet", "sqnxt", "resnet4", "resnet10", "alexnet")

#: Config names accepted by `get_config` (one `configs/<name>.py` each).
CONFIG_NAMES = ("default", "cifar10", "cifar100")

#: MODEL-METHOD used by the CIFAR configs when no argument is given.
DEFAULT_CIFAR_ARG = "resnet-anode"


def base_config() -> ml_collections.ConfigDict:
    """The base config (the CIFAR recipe) and the schema of every config."""
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
    c.model.method = "anode"  # the paper's network: baseline | backsolve | anode | anodev2
    c.model.num_steps = 2  # Nt: solver steps per ODE block
    c.model.solver = "euler"
    c.model.adjoint = "anode"  # the gradient strategy; "backsolve" iff method == backsolve
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
    """`"resnet4-anode"` -> `("resnet4", "anode")`; raises `ConfigError` (one line) otherwise."""
    model, sep, method = (arg or "").strip().partition("-")
    if not sep or model not in valid_models or method not in METHODS:
        raise ConfigError(
            f"config argument '{arg}' is not MODEL-METHOD with MODEL in {{{', '.join(valid_models)}}} "
            f"and METHOD in {{{', '.join(METHODS)}}} (e.g. 'resnet4-anode')"
        )
    return model, method


def apply_method(c: ml_collections.ConfigDict, method: str) -> None:
    """Set `model.method` and the adjoint the paper trained that method with."""
    c.model.method = method
    c.model.adjoint = METHOD_SPECS[method][1]


def block_type(method: str) -> str:
    """The `create_model` block type of a method (`residual`, `ode` or `coupled`)."""
    return METHOD_SPECS[method][0]


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
    """The config `configs/<name>.py:<arg>` builds; `name` may also be `"name:arg"`.

    Raises `ConfigError` (one line) for an unknown name or a bad argument.
    """
    if arg is None and ":" in name:
        name, arg = name.split(":", 1)
    if name == "default":
        if arg:
            raise ConfigError(f"config 'default' takes no argument, got {arg!r}")
        return _default()
    if name in ("cifar10", "cifar100"):
        return _cifar(name, arg)
    raise ConfigError(f"unknown config {name!r}; choose one of: {', '.join(CONFIG_NAMES)}")
