"""Offline default: the `small` ANODE network on scikit-learn's 8x8 digits.

    python train.py --config=configs/default.py --workdir=runs/default

Needs no download (the digits ship with scikit-learn): 1437 train / 360 test images,
fixed-seed stratified split.
"""

from anode_jax.training.defaults import apply_method, base_config


def get_config(arg=None):
    del arg
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
