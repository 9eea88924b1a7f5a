"""Pure train / eval steps: functions of explicit pytrees, no hidden state.

``make_train_step`` / ``make_eval_step`` close over the (static) model, optimizer and
preprocessing constants and return plain functions ``(state, images, labels) -> ...``
that the loop jit-compiles with explicit shardings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from anode_jax.data.augment import preprocess
from anode_jax.training.train_state import TrainState


def _variables(params, batch_stats):
    v = {"params": params}
    if batch_stats:
        v["batch_stats"] = batch_stats
    return v


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    *,
    pixel_scale: float,
    mean,
    std,
    augment: bool,
    crop_padding: int = 4,
    flip: bool = True,
    schedule: optax.Schedule | None = None,
):
    """Return ``train_step(state, images, labels) -> (new_state, metrics)``.

    ``images``: raw uint8 NHWC batch, ``labels``: int32. Metrics: loss, accuracy,
    grad_norm and (when ``schedule`` is given) the learning rate used by this step.
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


def make_eval_step(model, *, pixel_scale: float, mean, std):
    """Return ``eval_step(state, images, labels, mask) -> {loss_sum, correct, count}``."""
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
