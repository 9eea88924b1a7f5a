"""The model zoo uses no deprecated Flax API.

Every network of `anode_jax.models` (each block type) is initialized and applied with Python's
deprecation warnings as errors, and a method interceptor checks every `nn.Conv` it builds: the
convolution function comes through `conv_general_dilated_cls`, never through the field Flax
marks "Deprecated. Will be removed." (`conv_general_dilated`). The loop-safe `Conv` keeps the
parameters and outputs of a plain `nn.Conv`.
"""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anode_jax import models
from anode_jax.models import Conv


def _reject_deprecated_conv_field(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Conv) and module.conv_general_dilated is not None:
        raise AssertionError(f"{module.name}: nn.Conv(conv_general_dilated=...) is deprecated")
    return next_fun(*args, **kwargs)


@pytest.mark.parametrize("block", models.BLOCK_TYPES)
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_model_zoo_runs_with_flax_deprecations_as_errors(name, block):
    model = models.create_model(name, block=block, width=0.125, num_steps=1)
    x = jnp.zeros((2, 32, 32, 3), jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", PendingDeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        with nn.intercept_methods(_reject_deprecated_conv_field):
            variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
            for train in (True, False):
                out = jax.eval_shape(
                    lambda v: model.apply(v, x, train=train, mutable=["batch_stats"]), variables
                )
                chex.assert_shape(out[0], (2, 10))


@pytest.mark.parametrize("conv", models.CONV_NAMES)
def test_conv_keeps_the_parameters_and_outputs_of_nn_conv(conv):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    plain = nn.Conv(5, (3, 3), strides=(2, 2), padding="SAME", use_bias=True)
    ours = Conv(conv, 5, (3, 3), strides=(2, 2), padding="SAME", use_bias=True)
    variables = plain.init(jax.random.key(0), x)
    chex.assert_trees_all_equal_structs(variables, ours.init(jax.random.key(0), x))
    chex.assert_trees_all_close(
        ours.apply(variables, x), plain.apply(variables, x), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="conv must be one of"):
        Conv("fft", 5, (3, 3))
