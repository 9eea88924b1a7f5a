"""CIFAR-10 with the ANODE paper's recipe; config argument MODEL-METHOD.

    python train.py --config=configs/cifar10.py:resnet4-anode --workdir=runs/cifar10_resnet4_anode

MODEL in {resnet, sqnxt, resnet4, resnet10, alexnet}; METHOD in {baseline (plain residual
blocks), backsolve (Neural ODE adjoint), anode, anodev2 (coupled ODE, q=rda)}.
Recipe (Gholami et al. 2019): SGD momentum 0.9, weight decay 5e-4, lr 0.1 divided by 10 at
epoch 150 and by 100 at 250, 350 epochs, batch 256 (eval 128), Nt = 2, random crop with
4-px padding + horizontal flip, normalization mean (0.4914, 0.4822, 0.4465)
std (0.2023, 0.1994, 0.2010). Set --config.data.dir to a local copy in an official layout
(e.g. ../shared/data/cifar10) to skip tensorflow-datasets.
"""

from anode_jax.training.defaults import apply_method, base_config, parse_model_method

DEFAULT_ARG = "resnet-anode"


def get_config(arg=None):
    model, method = parse_model_method(arg if arg else DEFAULT_ARG)
    c = base_config()
    c.data.name = "cifar10"
    c.model.name = model
    apply_method(c, method)
    return c
