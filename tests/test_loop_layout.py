"""Regression guard: no slow-path convolution inside the loops of a model's training step.

XLA:CPU runs a convolution inside a while body (``lax.scan``, looped checkpoints, the
backsolve adjoint) on its fast kernel only if it is already in the canonical layout
(``b01f_01io->b01f``, no window reversal); otherwise it takes a naive path, 10–100× slower
(docs/bench_conv.md). The models use the loop-safe convolution
(:func:`anode_jax.nn.conv_general_dilated`) for exactly this reason. This test compiles the
trainer's CPU training step of a ``resnet`` and an ``sqnxt`` ODE network (tiny width, Nt = 4, time loop
forced with ``unroll=False``) for every gradient strategy and asserts that the program has
convolutions inside loops and that all of them are canonical. No timing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from anode_jax.models import create_model
from anode_jax.nn import convs_in_loops, noncanonical_convs
from anode_jax.training import compile_steps, create_train_state

ADJOINTS = ("direct", "anode", "checkpointed:2", "backsolve")


def _training_step_hlo(name: str, adjoint: str, conv: str = "loop_safe") -> str:
    """The trainer's own train step (`compile_steps`), compiled for a batch of 2 8x8x3 images."""
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
    tx = optax.sgd(0.1, momentum=0.9)
    state = jax.eval_shape(lambda: create_train_state(model, tx, 0, (8, 8, 3)))
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((2,), jnp.int32)
    train_step, _ = compile_steps(model, tx)
    return train_step.lower(state, x, y).compile().as_text()


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
