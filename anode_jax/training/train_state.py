"""Explicit training state, model construction, optimizer and the state's initialization."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from anode_jax.training import sharding as shd
from anode_jax.training.configs import block_type


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes; a plain pytree of arrays.

    `rng` is raw uint32 key data (checkpoint-friendly); the step derives its key as
    `fold_in(wrap_key_data(rng), step)`.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "params": self.params,
            "batch_stats": self.batch_stats,
            "opt_state": self.opt_state,
            "rng": self.rng,
        }


def model_kwargs(config) -> dict[str, Any]:
    """The `anode_jax.models.create_model` keyword arguments a (validated) config maps to
    (`num_classes` is `None`: the dataset fills it in)."""
    return dict(
        num_classes=None,
        block=block_type(config.model.method),
        num_steps=config.model.num_steps,
        solver=config.model.solver,
        adjoint=config.model.adjoint,
        q=config.model.q,
        norm=config.model.norm,
        width=config.model.width,
    )


def build_model(config, num_classes: int):
    """`config.model` -> flax module via `anode_jax.models.create_model`."""
    from anode_jax.models import create_model

    kwargs = model_kwargs(config)
    kwargs["num_classes"] = num_classes
    return create_model(config.model.name, **kwargs)


def make_lr_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate as a function of the step count (an optax schedule, float32).

    `step`: `optax.piecewise_constant_schedule`, multiplying by `lr_gamma` at each
    epoch in `lr_milestones` (paper: 0.1, /10 at epoch 150, /100 at 250); `cosine`:
    `optax.warmup_cosine_decay_schedule` / `cosine_decay_schedule` to 0 at the end of
    the run; `constant`. `warmup_epochs` adds a linear warmup from
    `learning_rate / warmup_steps` (for `step` and `constant` it scales the schedule,
    so the milestones stay at absolute epochs).
    """
    o = config.optim
    total = config.num_epochs * steps_per_epoch
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    base = float(o.learning_rate)
    if o.schedule == "cosine":
        if warmup > 0:
            inner = optax.warmup_cosine_decay_schedule(
                base / warmup, base, warmup, max(total, warmup + 1)
            )
        else:
            inner = optax.cosine_decay_schedule(base, max(total, 1))
        ramp = None
    else:
        if o.schedule == "step":
            # A milestone after the last step never fires (and may not fit the int32 count).
            steps = [int(round(m * steps_per_epoch)) for m in o.lr_milestones]
            boundaries = {s: float(o.lr_gamma) for s in steps if s <= total}
            inner = optax.piecewise_constant_schedule(base, boundaries)
        elif o.schedule == "constant":
            inner = optax.constant_schedule(base)
        else:  # validated earlier
            raise ValueError(o.schedule)
        ramp = optax.linear_schedule(1.0 / warmup, 1.0, warmup - 1) if warmup > 1 else None

    def schedule(count):
        # optax schedules mix int32 counts with Python floats (rejected under
        # jax_numpy_dtype_promotion="strict"); evaluate them under standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            lr = jnp.asarray(inner(count), jnp.float32)
            if ramp is not None:
                lr = lr * jnp.asarray(ramp(count), jnp.float32)
        return lr

    return schedule


def _standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Trace optax internals under standard dtype promotion.

    optax 0.2.x mixes int32 step counts with Python floats (e.g. Adam's bias correction
    `b1 ** count`), which `jax_numpy_dtype_promotion="strict"` rejects; the model and
    our own code stay under whatever promotion mode is active.
    """

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(init, update)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """One optimizer for the whole run (momentum is never reset)."""
    o = config.optim
    parts = []
    if o.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    if o.name == "sgd":
        if o.weight_decay > 0:
            # PyTorch SGD weight decay: L2 term added to the gradient before momentum.
            parts.append(optax.add_decayed_weights(o.weight_decay))
        parts.append(optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
    elif o.name == "adamw":
        parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
    else:  # validated earlier
        raise ValueError(o.name)
    return _standard_promotion(optax.chain(*parts))


def create_train_state(
    model, tx: optax.GradientTransformation, seed: int, image_shape: tuple[int, ...]
) -> TrainState:
    """Initialize parameters and optimizer state from `seed` (pure function)."""
    root = jax.random.key(seed)
    init_key, data_key = jax.random.split(root)
    dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    variables = model.init({"params": init_key, "dropout": init_key}, dummy, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jax.random.key_data(data_key),
    )


def init_state(model, tx, seed: int, image_shape, mesh) -> TrainState:
    """`create_train_state` jit-compiled with a replicated output on `mesh`.

    Initialization runs once: on CPU it is compiled without LLVM optimizations (~10x
    faster to compile, e.g. 0.4 s instead of 4.4 s for `small`; the values are the same
    deterministic function of the seed on every run).
    """

    def init_train_state():
        return create_train_state(model, tx, seed, image_shape)

    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    return (
        jax.jit(init_train_state, out_shardings=shd.replicated(mesh))
        .lower()
        .compile(compiler_options=opts)()
    )


def param_count(params) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))
