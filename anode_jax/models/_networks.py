"""Networks of the ANODE / ANODEv2 papers and the `create_model` factory.

Every network takes NHWC float32 images and returns `(N, num_classes)` logits. Its
"dynamic" blocks are built by `_Network.dynamic_block` according to `block`:

* `"residual"`: `ResidualBlock` `z + f(z)` (the baseline of the paper tables),
* `"ode"`: `ODEBlock` (ANODE),
* `"coupled"`: `CoupledODEBlock` with parameter dynamics `q` (ANODEv2).

The three forms share the vector field `f` and the names of every submodule, so the
`vector_field` parameters of one form load into another (ANODEv2 adds `q`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from anode_jax.ode import ADJOINTS, EmbeddedTableau, get_adjoint, get_solver, solver_names

from ._blocks import CoupledODEBlock, ODEBlock, ResidualBlock
from ._layers import (
    CONV_NAMES,
    AlexNetVectorField,
    BasicBlock,
    ResNetVectorField,
    SqueezeNextBlock,
    SqueezeNextVectorField,
    conv_norm_relu,
    global_average_pool,
)
from ._norm import NORM_NAMES, scaled_channels
from ._rda import Q_NAMES

MODEL_NAMES = ("small", "resnet", "resnet4", "resnet10", "alexnet", "sqnxt")
BLOCK_TYPES = ("residual", "ode", "coupled")


class _Network(nn.Module):
    """Fields shared by all networks (see `create_model` for their meaning)."""

    num_classes: int = 10
    block: str = "ode"
    num_steps: int = 2
    solver: Any = "euler"
    adjoint: Any = "anode"
    q: str = "rda"
    norm: str = "batch"
    width: float = 1.0
    conv: str = "loop_safe"
    unroll: bool | int | None = None

    def ch(self, channels: int) -> int:
        """Channel count scaled by the width multiplier."""
        return scaled_channels(channels, self.width)

    def dynamic_block(
        self, vector_field: nn.Module, x: jax.Array, train: bool, name: str
    ) -> jax.Array:
        """Apply the residual / ODE / coupled block around `vector_field` to `x`."""
        if self.block == "residual":
            block = ResidualBlock(vector_field, name=name)
        elif self.block == "ode":
            block = ODEBlock(
                vector_field,
                num_steps=self.num_steps,
                solver=self.solver,
                adjoint=self.adjoint,
                unroll=self.unroll,
                name=name,
            )
        elif self.block == "coupled":
            block = CoupledODEBlock(
                vector_field,
                q=self.q,
                num_steps=self.num_steps,
                solver=self.solver,
                adjoint=self.adjoint,
                unroll=self.unroll,
                name=name,
            )
        else:
            raise ValueError(f"block must be one of {BLOCK_TYPES}, got {self.block!r}")
        return block(x, train)

    def head(self, x: jax.Array) -> jax.Array:
        """Global average pool → linear: `(N, H, W, C) → (N, num_classes)`."""
        return nn.Dense(self.num_classes, name="head")(global_average_pool(x))


class SmallNet(_Network):
    """Tiny network for scikit-learn's 8×8×1 digits (this project's design).

    `conv3×3(C_in→32)–norm–ReLU → dyn(32) → conv3×3/2(32→64)–norm–ReLU → dyn(64) →
    avg pool → linear`; dyn = block around `ResNetVectorField`. No conv biases.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c1, c2 = self.ch(32), self.ch(64)
        x = conv_norm_relu(x, c1, (3, 3), norm=self.norm, conv=self.conv, train=train, name="stem")
        x = self.dynamic_block(
            ResNetVectorField(c1, self.norm, self.conv, parent=None), x, train, "stage1_ode"
        )
        x = conv_norm_relu(
            x, c2, (3, 3), strides=2, norm=self.norm, conv=self.conv, train=train, name="down2"
        )
        x = self.dynamic_block(
            ResNetVectorField(c2, self.norm, self.conv, parent=None), x, train, "stage2_ode"
        )
        return self.head(x)


class ResNet18(_Network):
    """ANODE's ResNet-18 layout (`"resnet"`).

    Stem `conv3×3(C_in→64)–BN–ReLU` (no bias); four stages of 64/128/256/512 channels
    with strides 1/2/2/2, each a standard `BasicBlock` then one dynamic block
    around `ResNetVectorField`; head avg pool → linear. Channels × `width`.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv_norm_relu(
            x, self.ch(64), (3, 3), norm=self.norm, conv=self.conv, train=train, name="stem"
        )
        for i, (channels, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), start=1):
            c = self.ch(channels)
            x = BasicBlock(c, stride, self.norm, self.conv, name=f"stage{i}_block")(x, train)
            x = self.dynamic_block(
                ResNetVectorField(c, self.norm, self.conv, parent=None), x, train, f"stage{i}_ode"
            )
        return self.head(x)


class ResNet4(_Network):
    """ResNet-4 (this project's definition; the papers do not publish the layers).

    `conv3×3(C_in→64)–BN–ReLU → dyn(64) → avg pool → linear`: 1 + 2 + 1 = 4 weight
    layers, dyn = block around `ResNetVectorField`.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = self.ch(64)
        x = conv_norm_relu(x, c, (3, 3), norm=self.norm, conv=self.conv, train=train, name="stem")
        x = self.dynamic_block(
            ResNetVectorField(c, self.norm, self.conv, parent=None), x, train, "stage1_ode"
        )
        return self.head(x)


class ResNet10(_Network):
    """ResNet-10 (this project's definition; the papers do not publish the layers).

    Stem `conv3×3(C_in→64)–BN–ReLU`; four stages of 64/128/256/512 channels, each one
    dynamic block around `ResNetVectorField`; stages 2–4 are entered through a
    projection `BN(conv1×1/2)` (no ReLU), uncounted like ResNet shortcut projections:
    1 + 4·2 + 1 = 10 weight layers. Head avg pool → linear.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv_norm_relu(
            x, self.ch(64), (3, 3), norm=self.norm, conv=self.conv, train=train, name="stem"
        )
        for i, channels in enumerate((64, 128, 256, 512), start=1):
            c = self.ch(channels)
            if i > 1:
                x = conv_norm_relu(
                    x,
                    c,
                    (1, 1),
                    strides=2,
                    norm=self.norm,
                    conv=self.conv,
                    train=train,
                    name=f"down{i}",
                    relu=False,
                )
            x = self.dynamic_block(
                ResNetVectorField(c, self.norm, self.conv, parent=None), x, train, f"stage{i}_ode"
            )
        return self.head(x)


class AlexNet(_Network):
    """CIFAR AlexNet with an ODE block (this project's definition).

    `conv5×5(C_in→64) → pool → conv5×5(64→192) → pool → conv3×3(192→384) →
    conv3×3(384→256) → dyn(256) → pool → avg pool → linear`; each conv without bias,
    followed by norm and ReLU; pools are 3×3 max, stride 2, SAME. The fifth conv
    (256→256, the only same-shape one) is the dynamic block around
    `AlexNetVectorField`. The classic 4096-wide FC layers are replaced by the
    global-pool + linear head so that the network accepts any input size.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def pool(h):
            return nn.max_pool(h, (3, 3), strides=(2, 2), padding="SAME")

        x = pool(
            conv_norm_relu(
                x, self.ch(64), (5, 5), norm=self.norm, conv=self.conv, train=train, name="conv1"
            )
        )
        x = pool(
            conv_norm_relu(
                x, self.ch(192), (5, 5), norm=self.norm, conv=self.conv, train=train, name="conv2"
            )
        )
        x = conv_norm_relu(
            x, self.ch(384), (3, 3), norm=self.norm, conv=self.conv, train=train, name="conv3"
        )
        c = self.ch(256)
        x = conv_norm_relu(x, c, (3, 3), norm=self.norm, conv=self.conv, train=train, name="conv4")
        x = self.dynamic_block(
            AlexNetVectorField(c, self.norm, self.conv, parent=None), x, train, "conv5_ode"
        )
        return self.head(pool(x))


class SqueezeNext23(_Network):
    """ANODE's SqueezeNext-23 (width 1.0) layout (`"sqnxt"`).

    Stem `conv3×3(C_in→64)` with bias–BN–ReLU; four stages of 32/64/128/256 channels
    with strides 1/2/2/2, each a standard `SqueezeNextBlock` then one dynamic
    block around `SqueezeNextVectorField`; head `conv1×1(→128)` (bias)–BN–ReLU
    → avg pool → linear. Channels × `width`.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv_norm_relu(
            x,
            self.ch(64),
            (3, 3),
            norm=self.norm,
            conv=self.conv,
            train=train,
            name="stem",
            use_bias=True,
        )
        for i, (channels, stride) in enumerate(zip((32, 64, 128, 256), (1, 2, 2, 2)), start=1):
            c = self.ch(channels)
            x = SqueezeNextBlock(c, stride, self.norm, self.conv, name=f"stage{i}_block")(x, train)
            x = self.dynamic_block(
                SqueezeNextVectorField(c, self.norm, self.conv, parent=None),
                x,
                train,
                f"stage{i}_ode",
            )
        x = conv_norm_relu(
            x,
            self.ch(128),
            (1, 1),
            norm=self.norm,
            conv=self.conv,
            train=train,
            name="head_pre",
            use_bias=True,
        )
        return self.head(x)


_NETWORKS: dict[str, type[_Network]] = {
    "small": SmallNet,
    "resnet": ResNet18,
    "resnet4": ResNet4,
    "resnet10": ResNet10,
    "alexnet": AlexNet,
    "sqnxt": SqueezeNext23,
}


def _choice(argument: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}")


def _positive_int(argument: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be a positive integer, got {value!r}")


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    block: str = "ode",
    num_steps: int = 2,
    solver: Any = "euler",
    adjoint: Any = "anode",
    q: str = "rda",
    norm: str = "batch",
    width: float = 1.0,
    conv: str = "loop_safe",
    unroll: bool | int | None = None,
) -> nn.Module:
    """Build one of `MODEL_NAMES` as a `flax.linen.Module`.

    Args:
      name: network, one of `MODEL_NAMES`.
      num_classes: logits per example (10 for CIFAR-10/digits, 100 for CIFAR-100).
      block: one of `BLOCK_TYPES`: `"residual"` (baseline `z + f(z)`),
        `"ode"` (ANODE) or `"coupled"` (ANODEv2).
      num_steps: fixed solver steps over `[0, 1]` (`dt = 1/num_steps`; paper: 2).
      solver: `"euler" | "midpoint" | "heun" | "rk4"` or a ButcherTableau object.
      adjoint: `"direct" | "anode" | "backsolve" | "checkpointed:K"` or an adjoint
        object of `anode_jax.ode`.
      q: ANODEv2 parameter dynamics, one of `Q_NAMES` (used by `"coupled"`).
      norm: `"batch"` or `"group"`.
      width: channel multiplier (> 0).
      conv: convolution implementation, one of `CONV_NAMES`: `"loop_safe"`
        (`anode_jax.nn.conv_general_dilated`, gradients fast inside loops on CPU;
        reverse mode only) or `"lax"` (`lax.conv_general_dilated`). Parameters and
        outputs are the same for both.
      unroll: time-loop unrolling of the ODE blocks, passed to `anode_jax.odeint`
        (True, False, an int n, or None for the core's default).

    Returns an unbound module; `init(rngs, x, train=False)` with `x` of shape
    `(N, H, W, C)` gives `{"params", "batch_stats"}` (no `batch_stats` for
    `norm="group"`), and `apply(..., x, train)` gives `(N, num_classes)` logits.

    Raises:
      ValueError: naming the offending argument and its valid choices.
    """
    _choice("name", name, MODEL_NAMES)
    _choice("block", block, BLOCK_TYPES)
    _choice("q", q, Q_NAMES)
    _choice("norm", norm, NORM_NAMES)
    _positive_int("num_classes", num_classes)
    _positive_int("num_steps", num_steps)
    # The core parses solvers and gradient strategies; validate here so that a bad value
    # fails at construction, not at the first forward pass.
    try:
        parsed = get_solver(solver)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"solver must be one of {tuple(solver_names())}, a ButcherTableau or another "
            f"solver object of anode_jax.ode, got {solver!r}"
        ) from error
    if isinstance(parsed, EmbeddedTableau):
        # The blocks keep BatchNorm running statistics per solver time (Zhang et al. 2019,
        # ANODEv2): fixed step times, which adaptive steps would change from batch to batch.
        raise ValueError(
            f"solver={solver!r} is adaptive; the networks' ODE blocks take fixed-step solvers "
            f"(their BatchNorm statistics are kept per solver time): one of "
            f"{tuple(solver_names())} or a ButcherTableau"
        )
    try:
        get_adjoint(adjoint)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f'adjoint must be one of {ADJOINTS}, "checkpointed:K" (K >= 1) or an adjoint '
            f'object of anode_jax.ode ("reversible" needs a reversible solver), got {adjoint!r}'
        ) from error
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    _choice("conv", conv, CONV_NAMES)
    if unroll is not None and not isinstance(unroll, (bool, int)):
        raise ValueError(f"unroll must be None, a bool or an int, got {unroll!r}")
    return _NETWORKS[name](
        num_classes=num_classes,
        block=block,
        num_steps=num_steps,
        solver=solver,
        adjoint=adjoint,
        q=q,
        norm=norm,
        width=float(width),
        conv=conv,
        unroll=unroll,
    )


def count_params(tree: Any) -> int:
    """Total number of scalars in a pytree (e.g. `variables["params"]`)."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(tree))
