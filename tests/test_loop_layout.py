"""Regression guard: no slow-path convolution inside the loops of a model's training step.

XLA:CPU runs a convolution inside a while body (``lax.scan``, looped checkpoints, the
backsolve adjoint) on its fast kernel only if it is already in the canonical layout
(``b01f_01io->b01f``, no window reversal); otherwise it takes a naive path, 10–100× slower
(docs/bench_conv.md). The models use the loop-safe convolution
(:func:`anode_jax.nn.conv_general_dilated`) for exactly this reason. This test compiles the
CPU training step of a ``resnet`` and an ``sqnxt`` ODE network (tiny width, Nt = 4, time loop
forced with ``unroll=False``) for every gradient strategy and asserts that the program has
convolutions inside loops and that all of them are canonical. No timing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from anode_jax.models import create_model
from anode_jax.nn import convs_in_loops, noncanonical_convs

ADJOINTS = ("direct", "anode", "checkpointed:2", "backsolve")


def _training_step_hlo(name: str, adjoint: str, conv: str = "loop_safe") -> str:
    model = create_model(
        name,
        num_classes=10,
        block="ode",
        num_steps=4,
        solver="euler",
        adjoint=adjoint,
        width=0.125,
        conv=conv,
        unroll=False,
    )
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    y = jnp.zeros((2,), jnp.int32)
    variables = jax.eval_shape(lambda x: model.init({"params": jax.random.PRNGKey(0)}, x), x)
    tx = optax.sgd(0.1, momentum=0.9)

    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = jax.eval_shape(tx.init, params)
    return jax.jit(step).lower(params, stats, opt_state, x, y).compile().as_text()


@pytest.mark.slow
@pytest.mark.parametrize("adjoint", ADJOINTS)
@pytest.mark.parametrize("name", ("resnet", "sqnxt"))
def test_training_step_loops_contain_only_canonical_convs(name, adjoint):
    text = _training_step_hlo(name, adjoint)
    assert convs_in_loops(text), "expected the forced loop (unroll=False) to contain convolutions"
    bad = noncanonical_convs(text)
    assert not bad, f"{len(bad)} slow-path convolutions in loops, e.g. {bad[0][:300]}"


@pytest.mark.slow
def test_guard_detects_lax_convolutions_in_loops():
    # The same step with plain lax convolutions: the guard must fail it (transposed convs).
    assert noncanonical_convs(_training_step_hlo("resnet", "direct", conv="lax"))
