"""`anode_jax.models.BatchNorm` against flax's `nn.BatchNorm(momentum=0.9, epsilon=1e-5)`,
whose semantics its docstring promises: outputs in training and evaluation mode and the
running averages after several training steps (float32, tolerance of float32 round-off)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anode_jax.models import BatchNorm


def test_batchnorm_matches_flax_batchnorm_running_averages_and_outputs():
    ours = BatchNorm()
    ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    ref_eval = nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    # Channels with different means and spreads, so mean and variance cannot stand in for
    # each other.
    shift = jnp.arange(5, dtype=jnp.float32)
    spread = 0.5 + jnp.arange(5, dtype=jnp.float32)
    batches = [shift + spread * jax.random.normal(k, (16, 3, 3, 5), jnp.float32) for k in keys]
    v_ours = ours.init(jax.random.PRNGKey(1), batches[0], train=True)
    v_ref = ref.init(jax.random.PRNGKey(1), batches[0])
    for x in batches:
        y_ours, upd = ours.apply(v_ours, x, train=True, mutable=["batch_stats"])
        y_ref, upd_ref = ref.apply(v_ref, x, mutable=["batch_stats"])
        np.testing.assert_allclose(y_ours, y_ref, rtol=1e-5, atol=1e-5)
        v_ours = {"params": v_ours["params"], **upd}
        v_ref = {"params": v_ref["params"], **upd_ref}
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            v_ours["batch_stats"][name], v_ref["batch_stats"][name], rtol=1e-5, atol=1e-6
        )
    # Evaluation uses the running averages.
    x = batches[0]
    np.testing.assert_allclose(
        ours.apply(v_ours, x, train=False), ref_eval.apply(v_ref, x), rtol=1e-5, atol=1e-5
    )
