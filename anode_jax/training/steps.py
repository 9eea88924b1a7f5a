"""The train and eval steps: pure functions of explicit pytrees, no hidden state.

`make_train_step` / `make_eval_step` close over the (static) model, optimizer and
preprocessing constants and return plain functions `(state, images, labels) -> ...`;
`compile_steps` jit-compiles them with explicit shardings. This is the one training step
of the project: the trainer, the benchmarks and the tests all compile it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from anode_jax.data import preprocess
from anode_jax.training import sharding as shd
from anode_jax.training.train_state import TrainState

#: Preprocessing of already-normalized float inputs (benchmarks, layout tests): identity.
IDENTITY_PREPROCESSING = {"pixel_scale": 1.0, "mean": (0.0,), "std": (1.0,)}


def _variables(params, batch_stats):
    v = {"params": params}
    if batch_stats:
        v["batch_stats"] = batch_stats
    return v


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    *,
    pixel_scale: float = 1.0,
    mean=(0.0,),
    std=(1.0,),
    augment: bool = False,
    crop_padding: int = 4,
    flip: bool = True,
    schedule: optax.Schedule | None = None,
):
    """Return `train_step(state, images, labels) -> (new_state, metrics)`.

    `images`: raw NHWC batch (uint8 pixels, or floats with the identity defaults
    `pixel_scale=1, mean=0, std=1`), `labels`: int32 `(N,)`. The loss is the mean softmax
    cross-entropy; batch statistics are updated once per step. Metrics: loss, accuracy,
    grad_norm and (when `schedule` is given) the learning rate used by this step.
    """
    prep = functools.partial(
        preprocess,
        pixel_scale=pixel_scale,
        mean=tuple(mean),
        std=tuple(std),
        crop_pad=crop_padding if augment else 0,
        flip=flip and augment,
    )

    def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        aug_key, dropout_key = jax.random.split(key)
        x = prep(images, key=aug_key if augment else None)

        def loss_fn(params):
            logits, updates = model.apply(
                _variables(params, state.batch_stats),
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_key},
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), labels
            ).mean()
            return loss, (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        upd, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, upd)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=updates.get("batch_stats", state.batch_stats),
            opt_state=opt_state,
        )
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "grad_norm": optax.tree.norm(grads),
        }
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, metrics

    return train_step


def make_eval_step(model, *, pixel_scale: float = 1.0, mean=(0.0,), std=(1.0,)):
    """Return `eval_step(state, images, labels, mask) -> {loss_sum, correct, count}`."""
    prep = functools.partial(
        preprocess, key=None, pixel_scale=pixel_scale, mean=tuple(mean), std=tuple(std)
    )

    def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array):
        x = prep(images)
        logits = model.apply(_variables(state.params, state.batch_stats), x, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(losses * mask),
            "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
        }

    return eval_step


def compile_steps(model, tx, dataset=None, data_config=None, mesh=None, schedule=None):
    """Jit the pure train/eval steps with explicit shardings on `mesh`.

    Train step: `(state, images, labels) -> (state, metrics)`, state replicated and
    donated, batch sharded along the mesh's data axis. Eval step:
    `(state, images, labels, mask) -> sums`. `dataset` supplies the preprocessing
    constants (`pixel_scale`, `mean`, `std`; `None`: identity, for float inputs),
    `data_config` the augmentation (`augment`, `crop_padding`, `flip`; `None`: off),
    `mesh` the devices (`None`: one device).
    """
    mesh = shd.make_mesh(1) if mesh is None else mesh
    prep = (
        IDENTITY_PREPROCESSING
        if dataset is None
        else {"pixel_scale": dataset.pixel_scale, "mean": dataset.mean, "std": dataset.std}
    )
    aug = (
        {"augment": False}
        if data_config is None
        else {
            "augment": data_config.augment,
            "crop_padding": data_config.crop_padding,
            "flip": data_config.flip,
        }
    )
    repl, bsh = shd.replicated(mesh), shd.batch_sharded(mesh)
    train_step = jax.jit(
        make_train_step(model, tx, **prep, **aug, schedule=schedule),
        in_shardings=(repl, bsh, bsh),
        out_shardings=(repl, repl),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(model, **prep),
        in_shardings=(repl, bsh, bsh, bsh),
        out_shardings=repl,
    )
    return train_step, eval_step
