"""Tests of anode_jax.models (Flax networks of ANODE / ANODEv2).

Tolerances: float32 comparisons of the same computation reorganized use rtol 1e-5;
gradient strategies are compared in float64 at rtol 1e-8 (the issue's bound);
"exactly" means bitwise (rtol = atol = 0). Shapes are tiny (width ≤ 1/4, 8×8 images,
batch 2-4) and most numerics run eagerly: for these sizes op-by-op dispatch is much
cheaper than compiling each program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anode_jax import odeint
from anode_jax.models import (
    BLOCK_TYPES,
    MODEL_NAMES,
    NORM_NAMES,
    Q_NAMES,
    CoupledODEBlock,
    ODEBlock,
    ResidualBlock,
    ResNetVectorField,
    count_params,
    create_model,
    init_q_params,
    kernel_gradient,
    kernel_laplacian,
    parameter_field,
    rda_rhs,
)
from anode_jax.ode import stage_times
from tests.conftest import tree_allclose


def _normal(seed, shape, dtype=jnp.float32):
    # NumPy, not jax.random: eager jax.random compiles one program per shape and dtype.
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _as(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


# ------------------------------------------------------------------------------------------
# Public contract of the factory.


def test_public_name_tuples():
    assert MODEL_NAMES == ("small", "resnet", "resnet4", "resnet10", "alexnet", "sqnxt")
    assert BLOCK_TYPES == ("residual", "ode", "coupled")
    assert Q_NAMES == ("none", "rda", "conv")
    assert NORM_NAMES == ("batch", "group")


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(name="resnet18"), "name"),
        (dict(block="odes"), "block"),
        (dict(q="diffusion"), "q"),
        (dict(norm="layer"), "norm"),
        (dict(solver="rk45"), "solver"),
        (dict(solver="tsit5"), "solver"),
        (dict(adjoint="adjoint"), "adjoint"),
        (dict(adjoint="checkpointed:0"), "adjoint"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=2.0), "num_steps"),
        (dict(num_classes=0), "num_classes"),
        (dict(width=0.0), "width"),
    ],
)
def test_create_model_rejects_bad_arguments(kwargs, argument):
    kwargs = {"name": "small", **kwargs}
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=argument) as info:
        create_model(name, **kwargs)
    if argument in ("name", "block", "q", "norm", "solver", "adjoint"):
        # The message lists the valid choices.
        valid = {
            "name": MODEL_NAMES,
            "block": BLOCK_TYPES,
            "q": Q_NAMES,
            "norm": NORM_NAMES,
            "solver": ("euler", "rk4"),
            "adjoint": ("direct", "anode", "checkpointed"),
        }
        for choice in valid[argument]:
            assert choice in str(info.value)


def test_create_model_accepts_objects_for_solver_and_adjoint():
    from anode_jax.ode import RK4, Checkpointed

    model = create_model(
        "resnet4", solver=RK4, adjoint=Checkpointed(num_checkpoints=2), width=1 / 16
    )
    _, logits = _abstract_init(model, jnp.zeros((2, 8, 8, 3)))
    assert logits.shape == (2, 10)


# ------------------------------------------------------------------------------------------
# Parameter counts from the layer descriptions (independent of the implementation).


def _conv(kh, kw, cin, cout, bias):
    return kh * kw * cin * cout + (cout if bias else 0)


def _resnet_vf(c):
    return [(3, 3, c, c, False), (3, 3, c, c, False)]


def _sqnxt_vf(c):
    return [
        (1, 1, c, c // 2, True),
        (1, 1, c // 2, c // 4, True),
        (1, 3, c // 4, c // 2, True),
        (3, 1, c // 2, c // 2, True),
        (1, 1, c // 2, c, True),
    ]


def _basic_block(cin, c, stride):
    convs = [(3, 3, cin, c, False), (3, 3, c, c, False)]
    return convs + ([(1, 1, cin, c, False)] if stride != 1 or cin != c else [])


def _sqnxt_block(cin, c, stride):
    r = 1.0 if stride == 2 else (0.25 if cin > c else 0.5)
    a = int(cin * r)
    convs = [
        (1, 1, cin, a, True),
        (1, 1, a, a // 2, True),
        (1, 3, a // 2, a, True),
        (3, 1, a, a, True),
        (1, 1, a, c, True),
    ]
    return convs + ([(1, 1, cin, c, True)] if stride != 1 or cin != c else [])


def _layout(name, w, cin):
    """(standard convs, vector-field convs, head input features) of each network.

    Every conv listed is followed by a normalization with 2·C_out parameters.
    """
    c = lambda n: int(n * w)
    std, vfs = [], []
    if name == "small":
        std += [(3, 3, cin, c(32), False), (3, 3, c(32), c(64), False)]
        vfs += [_resnet_vf(c(32)), _resnet_vf(c(64))]
        return std, vfs, c(64)
    if name == "resnet":
        std.append((3, 3, cin, c(64), False))
        prev = c(64)
        for ch, s in zip((64, 128, 256, 512), (1, 2, 2, 2)):
            std += _basic_block(prev, c(ch), s)
            vfs.append(_resnet_vf(c(ch)))
            prev = c(ch)
        return std, vfs, prev
    if name == "resnet4":
        std.append((3, 3, cin, c(64), False))
        vfs.append(_resnet_vf(c(64)))
        return std, vfs, c(64)
    if name == "resnet10":
        std.append((3, 3, cin, c(64), False))
        prev = c(64)
        for ch in (64, 128, 256, 512):
            if ch != 64:
                std.append((1, 1, prev, c(ch), False))
            vfs.append(_resnet_vf(c(ch)))
            prev = c(ch)
        return std, vfs, prev
    if name == "alexnet":
        std += [
            (5, 5, cin, c(64), False),
            (5, 5, c(64), c(192), False),
            (3, 3, c(192), c(384), False),
            (3, 3, c(384), c(256), False),
        ]
        vfs.append([(3, 3, c(256), c(256), False)])
        return std, vfs, c(256)
    if name == "sqnxt":
        std.append((3, 3, cin, c(64), True))
        prev = c(64)
        for ch, s in zip((32, 64, 128, 256), (1, 2, 2, 2)):
            std += _sqnxt_block(prev, c(ch), s)
            vfs.append(_sqnxt_vf(c(ch)))
            prev = c(ch)
        std.append((1, 1, prev, c(128), True))
        return std, vfs, c(128)
    raise AssertionError(name)


def expected_counts(name, *, width, in_channels=3, num_classes=10, knots=1):
    """{"params", "batch_stats", "rda", "conv"}: baseline params, BN statistics, and the
    extra ANODEv2 parameters p for q="rda" (5 per output channel of every vector-field
    kernel: diffusivity, 2 velocities, 2 reaction coefficients) and q="conv"
    (O·(kh·kw)² tap-mixing weights per kernel). Vector-field statistics are kept per
    evaluation time: `knots` rows (1 for the residual block, 2 for Euler with N_t = 2), plus
    the `knots` times themselves per block."""
    std, vfs, head_in = _layout(name, width, in_channels)
    convs = std + [conv for vf in vfs for conv in vf]
    params = sum(_conv(*conv) + 2 * conv[3] for conv in convs) + head_in * num_classes + num_classes
    stats = sum(2 * conv[3] for conv in std) + knots * (
        sum(2 * conv[3] for vf in vfs for conv in vf) + len(vfs)  # + each block's stat_times
    )
    vf_convs = [conv for vf in vfs for conv in vf]
    rda = sum(5 * cout for _, _, _, cout, _ in vf_convs)
    mixing = sum(cout * (kh * kw) ** 2 for kh, kw, _, cout, _ in vf_convs)
    return {"params": params, "batch_stats": stats, "rda": rda, "conv": mixing}


def _abstract_init(model, x):
    """(variables, eval-mode logits) as shapes: init runs the forward pass once anyway."""
    return jax.eval_shape(
        lambda: model.init_with_output({"params": jax.random.PRNGKey(0)}, x, train=False)
    )[::-1]


def _without_q(tree):
    if not isinstance(tree, dict):
        return tree
    return {k: _without_q(v) for k, v in tree.items() if k != "q"}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_counts_and_shapes(name):
    """Every network in residual / ode / coupled(rda, conv) form: counts by formula, the
    same parameter tree in every form (ANODEv2 adds only `q`), statistics per knot (the
    default Euler, N_t = 2 solve evaluates at t = 0 and ½), output shapes in eval and train
    mode (shape inference only: eval_shape)."""
    width = 0.25
    x = jnp.zeros((2, 8, 8, 3))
    expected = expected_counts(name, width=width)
    shapes = {}
    for block, q, extra in [
        ("residual", "rda", 0),
        ("ode", "rda", 0),
        ("coupled", "rda", expected["rda"]),
        ("coupled", "conv", expected["conv"]),
    ]:
        model = create_model(name, block=block, q=q, width=width)
        variables, logits = _abstract_init(model, x)
        assert logits.shape == (2, 10) and logits.dtype == jnp.float32
        assert set(variables) == {"params", "batch_stats"}
        assert count_params(variables["params"]) == expected["params"] + extra, (block, q)
        knots = 1 if block == "residual" else 2
        stats = expected_counts(name, width=width, knots=knots)["batch_stats"]
        assert count_params(variables["batch_stats"]) == stats, (block, q)
        shapes[block, q] = jax.tree.map(lambda a: a.shape, _without_q(variables["params"]))
        if block == "ode":
            logits, updates = jax.eval_shape(
                lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables
            )
            assert logits.shape == (2, 10)
            assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
                variables["batch_stats"]
            )
    assert (
        shapes["residual", "rda"]
        == shapes["ode", "rda"]
        == shapes["coupled", "rda"]
        == shapes["coupled", "conv"]
    )


def test_num_classes_and_input_channels():
    model = create_model("sqnxt", num_classes=100, width=0.25)
    x = jnp.zeros((3, 16, 16, 5))
    variables, logits = _abstract_init(model, x)
    assert (
        count_params(variables["params"])
        == expected_counts("sqnxt", width=0.25, in_channels=5, num_classes=100)["params"]
    )
    assert logits.shape == (3, 100)


def test_small_network_hand_count():
    """`small` at width 1 on 8×8×1 digits, counted by hand:
    stem 3·3·1·32 + 2·32 = 352; ODE(32) 2·(3·3·32·32 + 2·32) = 18560;
    down 3·3·32·64 + 2·64 = 18560; ODE(64) 2·(3·3·64·64 + 2·64) = 73984; head 64·10 + 10 = 650.
    Statistics: 2·(32 + 64) outside the blocks, 2·(2·32 + 2·64) per knot inside them, with two
    knots (Euler, N_t = 2: t = 0, ½) and the two times per block: 192 + 2·384 + 2·2 = 964.
    ANODEv2 rda: 5·(32+32+64+64) = 960."""
    x = jnp.zeros((4, 8, 8, 1))
    ode, _ = _abstract_init(create_model("small"), x)
    assert count_params(ode["params"]) == 352 + 18560 + 18560 + 73984 + 650 == 112106
    assert count_params(ode["batch_stats"]) == 192 + 2 * 384 + 2 * 2 == 964
    baseline, _ = _abstract_init(create_model("small", block="residual"), x)
    assert count_params(baseline["params"]) == 112106
    coupled, _ = _abstract_init(create_model("small", block="coupled", q="rda"), x)
    assert count_params(coupled["params"]) == 112106 + 960


def _fill(shapes, seed=0, dtype=None, stat_times=None):
    """Concrete variables for a tree of ShapeDtypeStructs, drawn with NumPy.

    Eager flax init compiles one random-number program per parameter shape, which costs
    more than the tests themselves; these values play the same role: LeCun-normal
    kernels, scales near 1, small biases, non-trivial running statistics (so that eval
    mode depends on them) and non-trivial ANODEv2 parameters (the default init is zero
    tap mixing / zero advection, which would leave parts of q untested). The blocks'
    `stat_times` are not random: they are the knots of the module's solve (`stat_times`),
    as the real init writes them (a lone residual block: t = 0).
    """
    rng = np.random.default_rng(seed)

    def leaf(path, struct):
        name, shape = path[-1].key, struct.shape
        if name == "stat_times":
            value = np.zeros(shape) if stat_times is None else np.asarray(stat_times)
            assert value.shape == shape, (path, shape, stat_times)
            return jnp.asarray(value, struct.dtype)
        if name == "kernel":
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, size=shape)
        elif name == "diffusion":
            value = rng.normal(-1.0, 0.5, size=shape)
        elif name == "mixing":
            value = 0.2 * rng.normal(size=shape)
        else:  # bias, mean, velocity, reaction_*
            value = 0.3 * rng.normal(size=shape)
        return jnp.asarray(value, dtype or struct.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def _variables(module, *args, seed=0, dtype=None, **kwargs):
    """Variables of `module` (tree from its real init, traced only; values from _fill)."""
    shapes = jax.eval_shape(lambda: module.init({"params": jax.random.PRNGKey(0)}, *args, **kwargs))
    if hasattr(module, "num_steps"):  # an ODE block or a network of them
        times = stage_times(module.solver, module.num_steps)[0]
        return _fill(shapes, seed, dtype, stat_times=times)
    return _fill(shapes, seed, dtype)


def test_init_values_of_a_block():
    """The real (concrete) init: θ₀ is the vector field's own init, running statistics
    start at mean 0 / var 1, ANODEv2 starts from weak diffusion and no advection/reaction."""
    vf = ResNetVectorField(4)
    z = _normal(0, (2, 4, 4, 4))
    variables = CoupledODEBlock(vf, q="rda").init(jax.random.PRNGKey(0), z)
    theta = variables["params"]["vector_field"]
    assert jax.tree.map(jnp.shape, theta) == jax.tree.map(
        jnp.shape, vf.init(jax.random.PRNGKey(0), 0.0, z)["params"]
    )
    assert float(jnp.std(theta["Conv_0"]["kernel"])) > 0.05
    stats = variables["batch_stats"]["vector_field"]
    for norm in ("BatchStatNorm_0", "BatchStatNorm_1"):  # one row per knot (Euler N_t=2: 0, ½)
        np.testing.assert_array_equal(stats[norm]["mean"], np.zeros((2, 4)))
        np.testing.assert_array_equal(stats[norm]["var"], np.ones((2, 4)))
    q = variables["params"]["q"]["Conv_0"]["kernel"]
    np.testing.assert_allclose(jax.nn.softplus(q["diffusion"]), 0.1, rtol=1e-5)
    assert (
        not np.any(q["velocity"])
        and not np.any(q["reaction_tanh"])
        and not np.any(q["reaction_linear"])
    )


def test_group_norm_has_no_batch_stats():
    model = create_model("small", norm="group", width=0.25, num_steps=1)
    x = _normal(0, (2, 8, 8, 1))
    variables = _variables(model, x, train=False)
    assert set(variables) == {"params"}
    assert (
        count_params(variables["params"])
        == expected_counts("small", width=0.25, in_channels=1)["params"]
    )
    train_logits = model.apply(variables, x, train=True)  # nothing to update: no mutable needed
    eval_logits = model.apply(variables, x, train=False)
    assert train_logits.shape == (2, 10)
    # GroupNorm is per example: train and eval mode are the same function.
    tree_allclose(train_logits, eval_logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Block identities.

_Z_SHAPE = (3, 4, 4, 4)


def test_euler_single_step_ode_block_is_residual_block():
    """ANODE: forward Euler with N_t = 1 over [0, 1] is the residual block z + f(z), bitwise,
    for the output and for the running-statistics update.

    Both sides run compiled: an eager call of the ODE block is compiled (odeint caches one
    program per shape), and XLA's fused program may round differently from op-by-op
    dispatch (2.4e-7 here), so eager-vs-compiled is not a bitwise identity."""
    vf = ResNetVectorField(4)
    z = _normal(0, _Z_SHAPE)
    residual = ResidualBlock(vf)
    ode = ODEBlock(vf, num_steps=1, solver="euler", adjoint="anode")
    variables = _variables(residual, z)
    assert jax.tree.structure(_variables(ode, z)) == jax.tree.structure(variables)

    def apply(block, train):
        return jax.jit(lambda v, x: block.apply(v, x, train=train, mutable=["batch_stats"]))

    tree_allclose(
        apply(ode, False)(variables, z), apply(residual, False)(variables, z), rtol=0, atol=0
    )
    out_ode, upd_ode = apply(ode, True)(variables, z)
    out_res, upd_res = apply(residual, True)(variables, z)
    tree_allclose(out_ode, out_res, rtol=0, atol=0)
    tree_allclose(upd_ode, upd_res, rtol=0, atol=0)
    # Not trivially equal: the block does something and eval mode differs from train mode.
    assert float(jnp.max(jnp.abs(out_res - z))) > 1e-2
    assert float(jnp.max(jnp.abs(out_res - residual.apply(variables, z)))) > 1e-3


def test_coupled_block_with_constant_weights_is_ode_block():
    """ANODEv2 with q = "none" (dθ/dt = 0) reproduces ANODE: outputs and statistics bitwise,
    gradients (θ₀ through the state vs θ through args) to float32 round-off."""
    vf = ResNetVectorField(4)
    z = _normal(1, _Z_SHAPE)
    ode = ODEBlock(vf, num_steps=2, solver="rk4", adjoint="anode")
    coupled = CoupledODEBlock(vf, q="none", num_steps=2, solver="rk4", adjoint="anode")
    variables = _variables(ode, z)
    assert jax.tree.structure(_variables(coupled, z)) == jax.tree.structure(variables)
    tree_allclose(coupled.apply(variables, z), ode.apply(variables, z), rtol=0, atol=0)
    out_c, upd_c = coupled.apply(variables, z, train=True, mutable=["batch_stats"])
    out_o, upd_o = ode.apply(variables, z, train=True, mutable=["batch_stats"])
    tree_allclose(out_c, out_o, rtol=0, atol=0)
    tree_allclose(upd_c, upd_o, rtol=0, atol=0)

    def grads(block):
        def loss(params, z):
            out, _ = block.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                z,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(out))

        return jax.grad(loss, argnums=(0, 1))(variables["params"], z)

    tree_allclose(grads(coupled), grads(ode), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Normalization statistics: outside the solver, once per forward.


def _field_with_stats(vf, theta):
    def f(t, z):
        dz, state = vf.apply({"params": theta}, t, z, train=True, mutable=["norm_stats"])
        return dz, state["norm_stats"]

    return f


def test_running_statistics_are_kept_per_evaluation_time():
    """Forward Euler, N_t = 2 evaluates f at t = 0 (z₀) and t = ½ (z₀ + ½ f(z₀)): the block
    keeps one row of running statistics per time and applies one EMA step to each,
    running_k ← 0.9·running_k + 0.1·stats_k."""
    vf = ResNetVectorField(4)
    z0 = _normal(2, _Z_SHAPE)
    block = ODEBlock(vf, num_steps=2, solver="euler", adjoint="anode")
    variables = _variables(block, z0)
    out, updates = block.apply(variables, z0, train=True, mutable=["batch_stats"])

    f = _field_with_stats(vf, variables["params"]["vector_field"])
    k0, s0 = f(0.0, z0)
    z_half = z0 + 0.5 * k0
    k1, s1 = f(0.5, z_half)
    tree_allclose(out, z_half + 0.5 * k1, rtol=1e-5, atol=1e-6)
    running = variables["batch_stats"]["vector_field"]
    expected = jax.tree.map(lambda r, a, b: 0.9 * r + 0.1 * jnp.stack([a, b]), running, s0, s1)
    tree_allclose(updates["batch_stats"]["vector_field"], expected, rtol=1e-5, atol=1e-7)
    # The two evaluations really differ, so one average would describe neither.
    assert (
        float(jnp.max(jnp.abs(s0["BatchStatNorm_1"]["var"] - s1["BatchStatNorm_1"]["var"]))) > 1e-3
    )


def test_rk4_statistics_per_time_average_the_stages_at_that_time():
    """RK4, N_t = 1 evaluates f at t = 0, ½ (twice, at different states) and 1: three rows;
    the row at ½ is the quadrature-weighted mean of its two stages (weights ⅓, ⅓ → ½, ½)."""
    vf = ResNetVectorField(4)
    z0 = _normal(4, _Z_SHAPE)
    block = ODEBlock(vf, num_steps=1, solver="rk4", adjoint="anode", momentum=0.0)
    variables = _variables(block, z0)
    _, updates = block.apply(variables, z0, train=True, mutable=["batch_stats"])

    f = _field_with_stats(vf, variables["params"]["vector_field"])
    k1, s1 = f(0.0, z0)
    k2, s2 = f(0.5, z0 + 0.5 * k1)
    k3, s3 = f(0.5, z0 + 0.5 * k2)
    _, s4 = f(1.0, z0 + k3)
    expected = jax.tree.map(lambda a, b, c, d: jnp.stack([a, 0.5 * (b + c), d]), s1, s2, s3, s4)
    tree_allclose(updates["batch_stats"]["vector_field"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_kind", ["ode", "coupled"])
def test_eval_with_this_batchs_statistics_reproduces_training_mode(block_kind):
    """Momentum 0 stores exactly this batch's per-time statistics; evaluating the same batch
    with them must then equal the training-mode output (Euler, N_t = 4: every evaluation has
    its own time). One time-averaged row for all stages (what a single running average
    stores) does not: that is the error per-time statistics remove."""
    vf = ResNetVectorField(4)
    z0 = _normal(5, _Z_SHAPE)
    kwargs = dict(num_steps=4, solver="euler", adjoint="anode", momentum=0.0)
    block = (
        ODEBlock(vf, **kwargs) if block_kind == "ode" else CoupledODEBlock(vf, q="rda", **kwargs)
    )
    variables = _variables(block, z0)
    out_train, updates = block.apply(variables, z0, train=True, mutable=["batch_stats"])
    stats = updates["batch_stats"]
    out_eval = block.apply({**variables, "batch_stats": stats}, z0, train=False)
    tree_allclose(out_eval, out_train, rtol=1e-4, atol=1e-5)

    rows = jax.tree.map(lambda a: jnp.broadcast_to(a.mean(0), a.shape), stats["vector_field"])
    pooled = {**stats, "vector_field": rows}
    out_pooled = block.apply({**variables, "batch_stats": pooled}, z0, train=False)
    assert float(jnp.max(jnp.abs(out_pooled - out_train))) > 1e-3


def test_statistics_follow_the_solve_between_knots():
    """Rows recorded at t = 0 and ½ (Euler, N_t = 2) serve any other solve: an Euler N_t = 4
    evaluation normalizes its stages at 0, ¼, ½, ¾ with a, ½(a + b), b, b (linear in time,
    constant past the last knot), checked against the solve by hand; a training step of the
    N_t = 4 block first resamples the rows onto its own knots (momentum 1 keeps exactly the
    resampled rows) and records the new times."""
    vf = ResNetVectorField(4)
    z0 = _normal(6, _Z_SHAPE)
    two = ODEBlock(vf, num_steps=2, solver="euler")
    variables = _variables(two, z0)
    np.testing.assert_array_equal(variables["batch_stats"]["stat_times"], [0.0, 0.5])
    rows = variables["batch_stats"]["vector_field"]
    theta = variables["params"]["vector_field"]
    at = {
        0: jax.tree.map(lambda r: r[0], rows),
        1: jax.tree.map(lambda r: 0.5 * (r[0] + r[1]), rows),
        2: jax.tree.map(lambda r: r[1], rows),
        3: jax.tree.map(lambda r: r[1], rows),
    }
    four = ODEBlock(vf, num_steps=4, solver="euler", momentum=1.0)
    z = z0
    for n in range(4):
        z = z + 0.25 * vf.apply({"params": theta, "batch_stats": at[n]}, n / 4, z, train=False)
    tree_allclose(four.apply(variables, z0), z, rtol=1e-5, atol=1e-6)

    _, updates = four.apply(variables, z0, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(updates["batch_stats"]["stat_times"], [0.0, 0.25, 0.5, 0.75])
    expected = jax.tree.map(lambda *r: jnp.stack(r), *(at[n] for n in range(4)))
    tree_allclose(updates["batch_stats"]["vector_field"], expected, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def small_setup():
    """`small` with ANODE gradients (the backward recomputes each block), midpoint, N_t = 1."""
    model = create_model("small", width=0.125, num_steps=1, solver="midpoint", adjoint="anode")
    x = _normal(3, (4, 8, 8, 1))
    return model, _variables(model, x, train=False), x


def test_batch_stats_update_once_per_training_forward(small_setup):
    model, variables, x = small_setup
    stats0 = variables["batch_stats"]
    _, upd1 = model.apply(variables, x, train=True, mutable=["batch_stats"])
    upd1 = upd1["batch_stats"]
    for path, before in jax.tree_util.tree_leaves_with_path(stats0):
        after = _at(upd1, path)
        if path[-1].key == "stat_times":  # the knots stay where the solve evaluates
            np.testing.assert_array_equal(after, before)
        else:
            assert float(jnp.max(jnp.abs(after - before))) > 1e-4  # every statistic moved

    # The backward pass (ANODE recomputes every block) leaves them alone: the updates
    # returned next to the gradient are those of one forward.
    def loss(params):
        logits, upd = model.apply(
            {"params": params, "batch_stats": stats0}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(logits**2), upd["batch_stats"]

    grads, upd_grad = jax.grad(loss, has_aux=True)(variables["params"])
    tree_allclose(upd_grad, upd1, rtol=1e-6, atol=1e-7)
    assert float(jnp.max(jnp.abs(grads["stage1_ode"]["vector_field"]["Conv_0"]["kernel"]))) > 0

    # Exactly one EMA step per call: in training mode the batch statistics s do not depend
    # on the running ones, so a second call gives r₂ − r₁ = 0.9·(r₁ − r₀).
    _, upd2 = model.apply(
        {"params": variables["params"], "batch_stats": upd1}, x, train=True, mutable=["batch_stats"]
    )
    tree_allclose(
        jax.tree.map(jnp.subtract, upd2["batch_stats"], upd1),
        jax.tree.map(lambda a, b: 0.9 * (a - b), upd1, stats0),
        rtol=1e-4,
        atol=1e-6,
    )

    # Evaluation mode never writes them.
    _, upd_eval = model.apply(variables, x, train=False, mutable=["batch_stats"])
    tree_allclose(upd_eval["batch_stats"], stats0, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Gradients: exact strategies agree through whole networks (float64).

_X64_SMALL = dict(width=0.125, num_steps=3, solver="euler")


@pytest.mark.slow
@pytest.mark.parametrize("block, q", [("ode", "none"), ("coupled", "rda"), ("coupled", "conv")])
def test_gradients_agree_across_exact_adjoints(x64, block, q):
    """d loss / d(params, x) through `small` (two ODE blocks, Euler, N_t = 3, BatchNorm in
    training mode) is the same for "direct", "anode" and "checkpointed:2" (rtol 1e-8)."""
    x = _normal(4, (2, 8, 8, 1), jnp.float64)
    model = create_model("small", block=block, q=q, **_X64_SMALL)
    # flax creates float32 parameters: trace init in float32, fill the tree in float64.
    variables = _variables(model, x.astype(jnp.float32), seed=1, dtype=jnp.float64, train=False)

    def grads(adjoint):
        model = create_model("small", block=block, q=q, adjoint=adjoint, **_X64_SMALL)

        def loss(p, x):
            logits, upd = model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(logits)), upd

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)

    reference = grads("direct")
    assert reference[0][0]["stage2_ode"]["vector_field"]["Conv_1"]["kernel"].dtype == jnp.float64
    for adjoint in ("anode", "checkpointed:2"):
        tree_allclose(grads(adjoint), reference, rtol=1e-8, atol=1e-12)
    if q != "none":
        q_grads = jax.tree.leaves(reference[0][0]["stage1_ode"]["q"])
        assert all(float(jnp.max(jnp.abs(g))) > 0 for g in q_grads)


def test_rda_parameter_gradients_match_finite_differences(x64):
    """Central differences (h = 1e-5: truncation and round-off both ~1e-10) of a loss
    through `small` in ANODEv2 form (RDA, Euler, N_t = 3, ANODE gradients) along each
    kind of RDA parameter agree with the gradient to relative error < 1e-6."""
    x = _normal(4, (2, 8, 8, 1), jnp.float64)
    model = create_model("small", block="coupled", q="rda", adjoint="anode", **_X64_SMALL)
    variables = _variables(model, x.astype(jnp.float32), seed=2, dtype=jnp.float64, train=False)
    params = variables["params"]
    q_params = {name: params[name]["q"] for name in ("stage1_ode", "stage2_ode")}

    def loss(q_params):
        p = {**params, **{name: {**params[name], "q": q_params[name]} for name in q_params}}
        logits, _ = model.apply(
            {"params": p, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(logits))

    grad = jax.grad(loss)(q_params)
    loss = jax.jit(loss)  # 8 more forward evaluations: one compile is cheaper than eager
    h = 1e-5
    for i, kind in enumerate(("diffusion", "velocity", "reaction_tanh", "reaction_linear")):
        # Direction: random in the `kind` leaves of every kernel, zero elsewhere.
        direction = jax.tree_util.tree_map_with_path(
            lambda path, leaf: (
                _normal(100 + i, leaf.shape, leaf.dtype)
                if path[-1].key == kind
                else jnp.zeros_like(leaf)
            ),
            q_params,
        )
        plus = jax.tree.map(lambda a, d: a + h * d, q_params, direction)
        minus = jax.tree.map(lambda a, d: a - h * d, q_params, direction)
        fd = (loss(plus) - loss(minus)) / (2 * h)
        analytic = sum(
            jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))
        )
        assert abs(float(analytic)) > 1e-4, kind
        np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6, err_msg=kind)


# ------------------------------------------------------------------------------------------
# The RDA operator.


def _stencil_reference(kernel):
    """Laplacian and central gradients with edge-replicated ghost taps (written with
    padding, independently of the library's matrix form)."""
    p = np.pad(np.asarray(kernel), ((1, 1), (1, 1), (0, 0), (0, 0)), mode="edge")
    lap = p[2:, 1:-1] + p[:-2, 1:-1] + p[1:-1, 2:] + p[1:-1, :-2] - 4 * p[1:-1, 1:-1]
    return lap, 0.5 * (p[2:, 1:-1] - p[:-2, 1:-1]), 0.5 * (p[1:-1, 2:] - p[1:-1, :-2])


@pytest.mark.parametrize("taps", [(3, 3), (1, 3), (3, 1), (1, 1), (5, 4)])
def test_rda_operator_matches_stencil(x64, taps):
    kernel = _normal(6, taps + (2, 3), jnp.float64)
    lap, grad_h, grad_w = _stencil_reference(kernel)
    np.testing.assert_allclose(kernel_laplacian(kernel), lap, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(kernel_gradient(kernel)[0], grad_h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(kernel_gradient(kernel)[1], grad_w, rtol=1e-12, atol=1e-12)
    p = {
        "diffusion": _normal(7, (3,), jnp.float64),
        "velocity": _normal(8, (2, 3), jnp.float64),
        "reaction_tanh": _normal(9, (3,), jnp.float64),
        "reaction_linear": _normal(10, (3,), jnp.float64),
    }
    expected = (
        np.log1p(np.exp(np.asarray(p["diffusion"]))) * lap
        + np.asarray(p["velocity"][0]) * grad_h
        + np.asarray(p["velocity"][1]) * grad_w
        + np.asarray(p["reaction_tanh"]) * np.tanh(np.asarray(kernel))
        + np.asarray(p["reaction_linear"]) * np.asarray(kernel)
    )
    np.testing.assert_allclose(rda_rhs(kernel, p), expected, rtol=1e-12, atol=1e-12)
    if taps == (1, 1):
        assert not np.any(lap) and not np.any(grad_h) and not np.any(grad_w)


def test_rda_operator_hand_values():
    """A unit tap in the corner of a 3×3 kernel: Neumann Laplacian −2 there (two ghost
    neighbours equal it), +1 at its two neighbours; ∂_h = ½·(θ[i+1] − θ[i−1]) is
    ½·(0 − 1) at the corner (its ghost above equals it) and ½·(0 − 1) below it."""
    kernel = jnp.zeros((3, 3, 1, 1)).at[0, 0].set(1.0)
    lap = np.asarray(kernel_laplacian(kernel))[..., 0, 0]
    np.testing.assert_array_equal(lap, [[-2, 1, 0], [1, 0, 0], [0, 0, 0]])
    grad_h = np.asarray(kernel_gradient(kernel)[0])[..., 0, 0]
    np.testing.assert_array_equal(grad_h, [[-0.5, 0, 0], [-0.5, 0, 0], [0, 0, 0]])


def test_pure_diffusion_conserves_each_kernel_tap_sum(x64):
    """v = 0, a = b = 0: d/dt Σ_taps θ = 0 because the Neumann Laplacian has zero column
    sums; RK4 preserves linear invariants, so the sums agree to round-off (rtol 1e-12)."""
    theta = {
        "conv3x3": {
            "kernel": _normal(11, (3, 3, 2, 3), jnp.float64),
            "bias": _normal(12, (3,), jnp.float64),
        },
        "conv1x3": {"kernel": _normal(13, (1, 3, 3, 4), jnp.float64)},
        "conv3x1": {"kernel": _normal(14, (3, 1, 4, 2), jnp.float64)},
        "conv1x1": {"kernel": _normal(15, (1, 1, 2, 2), jnp.float64)},
    }
    p = init_q_params("rda", theta)
    # Diffusivities softplus(N(0, ½²) − ½) ≲ 1.2: RK4 with dt = ¼ is stable for the 3×3
    # Laplacian (spectral radius 6).
    p = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            0.5 * _normal(16, leaf.shape, leaf.dtype) - 0.5
            if path[-1].key == "diffusion"
            else jnp.zeros_like(leaf)
        ),
        p,
    )
    solve = jax.jit(
        lambda theta, p: odeint(
            lambda t, th, p: parameter_field("rda", th, p),
            theta,
            p,
            num_steps=4,
            solver="rk4",
            adjoint="direct",
        )
    )
    theta1 = solve(theta, p)
    for name in ("conv3x3", "conv1x3", "conv3x1", "conv1x1"):
        before, after = theta[name]["kernel"], theta1[name]["kernel"]
        np.testing.assert_allclose(
            after.sum(axis=(0, 1)), before.sum(axis=(0, 1)), rtol=1e-12, atol=1e-12
        )
        if name == "conv1x1":
            np.testing.assert_array_equal(after, before)  # Δ = 0 on a single tap
        else:  # diffusion did act: the taps were smoothed
            assert float(jnp.max(jnp.abs(after - before))) > 1e-2
            assert float(jnp.var(after, axis=(0, 1)).sum()) < float(
                jnp.var(before, axis=(0, 1)).sum()
            )
    np.testing.assert_array_equal(theta1["conv3x3"]["bias"], theta["conv3x3"]["bias"])


def test_q_params_layout():
    theta = {
        "Conv_0": {"kernel": jnp.zeros((3, 3, 2, 5))},
        "BatchStatNorm_0": {"scale": jnp.zeros(5)},
        "Conv_1": {"kernel": jnp.zeros((1, 3, 5, 4)), "bias": jnp.zeros(4)},
    }
    assert init_q_params("none", theta) == {}
    rda = jax.tree.map(jnp.shape, init_q_params("rda", theta))
    assert rda == {
        "Conv_0": {
            "kernel": {
                "diffusion": (5,),
                "velocity": (2, 5),
                "reaction_tanh": (5,),
                "reaction_linear": (5,),
            }
        },
        "Conv_1": {
            "kernel": {
                "diffusion": (4,),
                "velocity": (2, 4),
                "reaction_tanh": (4,),
                "reaction_linear": (4,),
            }
        },
    }
    conv = jax.tree.map(jnp.shape, init_q_params("conv", theta))
    assert conv == {
        "Conv_0": {"kernel": {"mixing": (5, 9, 9)}},
        "Conv_1": {"kernel": {"mixing": (4, 3, 3)}},
    }
    with pytest.raises(ValueError, match="q must be one of"):
        init_q_params("diffusion", theta)


# ------------------------------------------------------------------------------------------
# Transformations.


def test_vmap_over_independent_batches(small_setup):
    """vmap of a training forward over a stack of batches equals applying it per batch
    (each batch normalized with its own statistics; rtol 1e-5)."""
    model, variables, _ = small_setup
    xs = _normal(17, (2, 3, 8, 8, 1))

    def forward(x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    batched = jax.vmap(forward)(xs)
    for i in range(xs.shape[0]):
        tree_allclose(jax.tree.map(lambda a: a[i], batched), forward(xs[i]), rtol=1e-5, atol=1e-6)


def test_jit_train_step_matches_eager_and_compiles_once(small_setup):
    model, variables, x = small_setup
    traces = []

    def train_step(variables, x):
        traces.append(x.shape)  # runs only while tracing

        def loss(params):
            logits, upd = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean(logits**2), upd

        return jax.grad(loss, has_aux=True)(variables["params"])

    jitted = jax.jit(train_step)
    first = jitted(variables, x)
    assert traces == [x.shape]
    tree_allclose(first, train_step(variables, x), rtol=1e-5, atol=1e-6)
    traces.clear()
    second = jitted(variables, x + 1.0)  # same shapes, new values
    jax.block_until_ready(second)
    assert traces == [] and jitted._cache_size() == 1
    assert float(jnp.max(jnp.abs(second[0]["head"]["kernel"] - first[0]["head"]["kernel"]))) > 0
