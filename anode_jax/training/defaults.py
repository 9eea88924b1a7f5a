"""Old home of the base config; everything now lives in `anode_jax.training.configs`."""

from anode_jax.training.configs import (  # noqa: F401  (names kept for existing code)
    CIFAR_MODELS,
    METHOD_BLOCKS,
    METHODS,
    apply_method,
    base_config,
    parse_model_method,
)
