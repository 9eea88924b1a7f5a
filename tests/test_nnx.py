"""Flax NNX front-end (`anode_jax.nnx`): blocks around any `nnx.Module` field and the papers'
networks from NNX.

* NNX block == Linen block (`anode_jax.models`) for the same parameters: outputs, gradients
  and per-time BatchNorm statistics, training and evaluation, to float32 round-off
  (rtol 1e-5 on outputs and statistics, 2e-5 on gradients, which sum many more terms);
* every exact gradient strategy == "direct" in float64 (rtol 1e-9), looped and unrolled,
  with BatchNorm statistics and dropout inside the field;
* an `nnx.jit` + `nnx.Optimizer` step == the same step in Linen + optax; the NNX network's
  step == the Linen trainer's step.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from anode_jax import models
from anode_jax import nnx as anx
from tests.conftest import FAST_COMPILE

C = 4  # channels of the test fields
SHAPE = (3, 6, 6, C)


def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


class ResNetField(nnx.Module):
    """NNX twin of `models.ResNetVectorField(C, "batch")`: conv–BN–ReLU twice, with the
    loop-safe convolution of `anode_jax.nn` (solves loop on CPU without a slow gradient)."""

    def __init__(self, channels, *, dropout=0.0, dtype=jnp.float32, rngs):
        kw = dict(
            padding="SAME",
            use_bias=False,
            param_dtype=dtype,
            conv_general_dilated=anx.conv_general_dilated,
            rngs=rngs,
        )
        bn = dict(use_fast_variance=False, epsilon=1e-5, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.conv1 = nnx.Conv(channels, channels, (3, 3), **kw)
        self.bn1 = nnx.BatchNorm(channels, **bn)
        self.conv2 = nnx.Conv(channels, channels, (3, 3), **kw)
        self.bn2 = nnx.BatchNorm(channels, **bn)
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, t, z):
        h = nnx.relu(self.bn1(self.conv1(z)))
        return self.drop(nnx.relu(self.bn2(self.conv2(h))))


# Linen names -> NNX names of the same parameters and statistics.
_NAMES = {"Conv_0": "conv1", "BatchStatNorm_0": "bn1", "Conv_1": "conv2", "BatchStatNorm_1": "bn2"}


def _linen_block(kind, **kw):
    vf = models.ResNetVectorField(C, "batch", parent=None)
    if kind == "ode":
        return models.ODEBlock(vf, **kw)
    return models.CoupledODEBlock(vf, q=kind, **kw)


def _nnx_block(kind, field, **kw):
    if kind == "ode":
        return anx.ODEBlock(field, **kw)
    return anx.CoupledODEBlock(field, q=kind, **kw)


def _linen_variables(block, x, seed):
    """Linen variables with random parameters (and random q) and non-trivial statistics."""
    v = block.init(jax.random.key(seed), x, train=False)
    params = jax.tree.map(
        lambda a: a + 0.1 * _normal(seed + 1, a.shape), v["params"]
    )  # moves q off its (symmetric) initial values too
    return {"params": params, "batch_stats": v["batch_stats"]}


def _load(block, variables):
    """Copy Linen block variables into the NNX block (parameters, q, per-time statistics)."""
    theta = variables["params"]["vector_field"]
    for linen_name, nnx_name in _NAMES.items():
        layer = getattr(block.field, nnx_name)
        for leaf, value in theta[linen_name].items():
            getattr(layer, leaf)[...] = value
    if "q" in variables["params"]:
        block.q_params.set_value({_NAMES[k]: v for k, v in variables["params"]["q"].items()})
    stats = variables["batch_stats"]
    block.stats.set_value(
        {
            f"{_NAMES[layer]}/{leaf}": value
            for layer, d in stats["vector_field"].items()
            for leaf, value in d.items()
        }
    )
    block.stat_times[...] = stats["stat_times"]


def _nnx_stats_as_linen(block):
    rows = block.stats.get_value()
    inverse = {v: k for k, v in _NAMES.items()}
    out = {}
    for key, value in rows.items():
        layer, leaf = key.split("/")
        out.setdefault(inverse[layer], {})[leaf] = value
    return {"vector_field": out, "stat_times": block.stat_times[...]}


def _nnx_grads_as_linen(grads):
    g = nnx.to_pure_dict(grads)
    out = {"vector_field": {k: g["field"][v] for k, v in _NAMES.items()}}
    if "q_params" in g:
        out["q"] = {k: g["q_params"][v] for k, v in _NAMES.items() if v in g["q_params"]}
    return out


@pytest.mark.parametrize(
    "kind, solver, num_steps",
    [("ode", "euler", 2), ("ode", "rk4", 2), ("rda", "euler", 2), ("conv", "midpoint", 3)],
)
def test_nnx_block_equals_linen_block(kind, solver, num_steps):
    """Same parameters => same outputs, parameter (and q) gradients, updated per-time
    statistics in training mode, and same outputs in evaluation mode (float32 round-off)."""
    x = _normal(0, SHAPE)
    kw = dict(num_steps=num_steps, solver=solver, adjoint="anode")
    linen = _linen_block(kind, **kw)
    variables = _linen_variables(linen, x, seed=3)
    block = _nnx_block(kind, ResNetField(C, rngs=nnx.Rngs(0)), **kw)
    _load(block, variables)

    def linen_loss(params):
        out, upd = linen.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(out)), (out, upd["batch_stats"])

    (_, (ref_out, ref_stats)), ref_grads = jax.value_and_grad(linen_loss, has_aux=True)(
        variables["params"]
    )

    def nnx_loss(block):
        out = block(x)
        return jnp.sum(jnp.sin(out)), out

    (_, out), grads = nnx.value_and_grad(nnx_loss, has_aux=True)(block)
    chex.assert_trees_all_close(out, ref_out, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(_nnx_stats_as_linen(block), ref_stats, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(_nnx_grads_as_linen(grads), ref_grads, rtol=2e-5, atol=2e-5)
    assert float(jnp.max(jnp.abs(ref_stats["vector_field"]["BatchStatNorm_1"]["mean"]))) > 0

    # Evaluation: the updated per-time statistics, interpolated at each stage time.
    ref_eval = linen.apply(
        {"params": variables["params"], "batch_stats": ref_stats}, x, train=False
    )
    block.eval()
    chex.assert_trees_all_close(block(x), ref_eval, rtol=1e-5, atol=1e-6)


_STRATEGIES = [
    ("anode", "euler", True),
    ("anode", "euler", False),
    ("checkpointed:2", "rk4", True),
    ("checkpointed:2", "rk4", False),
    ("reversible", "reversible_heun", False),
    ("reversible", "reversible_heun", True),
]


_DIRECT = {}  # "direct" gradients per (kind, solver, unroll), computed once


def _to_float64(module):
    for kind in (nnx.Param, nnx.BatchStat):
        state = nnx.state(module, kind)
        nnx.update(module, jax.tree.map(lambda a: a.astype(jnp.float64), state))


@pytest.mark.parametrize("kind", ["ode", "rda"])
@pytest.mark.parametrize("adjoint, solver, unroll", _STRATEGIES)
def test_exact_strategies_equal_direct_float64(x64, kind, adjoint, solver, unroll):
    """d loss / d(θ, q, y0) with BatchNorm (training) and dropout inside the field: each
    exact strategy, looped and unrolled, equals "direct" to rtol 1e-9 in float64; the
    updated statistics are equal too (the backward recomputation reuses the masks)."""
    x = _normal(1, SHAPE, jnp.float64)

    def run(adjoint, unroll):
        field = ResNetField(C, dropout=0.25, dtype=jnp.float64, rngs=nnx.Rngs(0, dropout=5))
        _to_float64(field)  # nnx.BatchNorm keeps float32 statistics whatever param_dtype
        block = _nnx_block(kind, field, num_steps=3, solver=solver, adjoint=adjoint, unroll=unroll)
        _to_float64(block)  # ANODEv2's q parameters are created in float32

        def loss(block, x):
            return jnp.sum(jnp.sin(block(x)))

        # One compiled program per strategy (forward, statistics update and gradient) instead
        # of an op-by-op eager trace, compiled without LLVM's optimizations (FAST_COMPILE):
        # the property is the arithmetic, not the machine code's speed.
        graphdef, state = nnx.split(block)

        @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
        def gradients(state, x):
            block = nnx.merge(graphdef, state)
            grads = nnx.grad(loss, argnums=(0, 1))(block, x)
            return nnx.to_pure_dict(grads[0]), grads[1], nnx.state(block)

        # nnx.BatchNorm computes its statistics with jnp.promote_types(dtype, float32), which
        # strict promotion rejects for float64; the block itself runs under strict promotion
        # in the float32 tests.
        with jax.numpy_dtype_promotion("standard"):
            grad_block, grad_x, state = gradients(state, x)
        nnx.update(block, state)
        return grad_block, grad_x, block.stats.get_value()

    got = run(adjoint, unroll)
    reference = (kind, solver, unroll)
    if reference not in _DIRECT:
        _DIRECT[reference] = run("direct", unroll)
    want = _DIRECT[reference]
    assert jax.tree.leaves(want[:2])[0].dtype == jnp.float64
    chex.assert_trees_all_close(got[:2], want[:2], rtol=1e-9, atol=1e-12)
    chex.assert_trees_all_close(got[2], want[2], rtol=1e-9, atol=1e-12)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(want[:2]))


def test_dropout_is_a_function_of_the_stream_and_the_time():
    """Two copies of a block draw the same masks; one block's next call draws new ones (its
    streams advance once per call); without dropout in evaluation nothing is random."""
    x = _normal(2, SHAPE)
    block = anx.ODEBlock(ResNetField(C, dropout=0.5, rngs=nnx.Rngs(0, dropout=1)), num_steps=2)
    twin = nnx.clone(block)
    first = block(x)
    chex.assert_trees_all_close(twin(x), first, rtol=0, atol=0)
    second = block(x)
    assert float(jnp.max(jnp.abs(second - first))) > 1e-3
    count = block.field.drop.rngs.count[...]
    assert int(count) == 2
    block.eval()
    chex.assert_trees_all_close(block(x), block(x), rtol=0, atol=0)
    assert int(block.field.drop.rngs.count[...]) == 2 + 2  # streams still advance per call


def test_field_without_state_and_stage_times_of_the_field():
    """A field without BatchNorm or RNG: the block is `odeint` of `field(t, y)` with the
    parameters as args (RK4 of a linear time-dependent field, against the core directly)."""

    class Linear(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(0.3 * _normal(4, (5, 5)))

        def __call__(self, t, y):
            return (1.0 + t) * y @ self.w[...]

    field = Linear(nnx.Rngs(0))
    y0 = _normal(5, (2, 5))
    block = anx.ODEBlock(field, num_steps=4, solver="rk4")
    assert block.stats is None
    from anode_jax.ode import odeint

    want = odeint(lambda t, y, w: (1.0 + t) * y @ w, y0, field.w[...], num_steps=4, solver="rk4")
    chex.assert_trees_all_close(block(y0), want, rtol=1e-6, atol=1e-6)


def test_jit_optimizer_step_equals_linen_optax_step():
    """`nnx.jit` + `nnx.value_and_grad` + `nnx.Optimizer` (SGD with momentum), two steps,
    == `jax.value_and_grad` + optax on the Linen block: parameters and statistics."""
    x, target = _normal(6, SHAPE), _normal(7, SHAPE)
    kw = dict(num_steps=2, solver="heun", adjoint="anode")
    linen = _linen_block("ode", **kw)
    variables = _linen_variables(linen, x, seed=8)
    block = anx.ODEBlock(ResNetField(C, rngs=nnx.Rngs(0)), **kw)
    _load(block, variables)
    tx = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def linen_step(params, stats, opt_state):
        def loss(p):
            out, upd = linen.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.mean((out - target) ** 2), upd["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, value

    optimizer = nnx.Optimizer(block, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(block, optimizer):
        def loss(block):
            return jnp.mean((block(x) - target) ** 2)

        value, grads = nnx.value_and_grad(loss)(block)
        optimizer.update(block, grads)
        return value

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    for _ in range(2):
        params, stats, opt_state, want = linen_step(params, stats, opt_state)
        got = nnx_step(block, optimizer)
        chex.assert_trees_all_close(got, want, rtol=1e-5)
    nnx_params = {"vector_field": _nnx_grads_as_linen(nnx.state(block, nnx.Param))["vector_field"]}
    chex.assert_trees_all_close(nnx_params, params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(_nnx_stats_as_linen(block), stats, rtol=1e-5, atol=1e-6)
    assert int(optimizer.step[...]) == 2


def test_bad_fields_and_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="field must be an nnx.Module"):
        anx.ODEBlock(lambda t, y: y)
    with pytest.raises(ValueError, match="q must be one of"):
        anx.CoupledODEBlock(ResNetField(C, rngs=nnx.Rngs(0)), q="heat")
    field = ResNetField(C, rngs=nnx.Rngs(0))
    field.bn1.use_running_average = True  # bn2 stays in training mode
    with pytest.raises(ValueError, match="use_running_average set, all to the same value"):
        anx.ODEBlock(field)(_normal(0, SHAPE))

    class Counter(nnx.Module):
        def __init__(self):
            self.seen = nnx.BatchStat(jnp.zeros(()))

        def __call__(self, t, y):
            return y

    with pytest.raises(NotImplementedError, match="outside nnx.BatchNorm"):
        anx.ODEBlock(Counter())


# ------------------------------------------------------------------------------------------
# The papers' networks from NNX (the Linen definitions through flax.nnx.bridge).


def test_network_variables_are_the_linen_variables():
    net = anx.create_model(
        "small", input_shape=(8, 8, 1), rngs=nnx.Rngs(0), width=0.25, num_steps=2
    )
    linen = models.create_model("small", width=0.25, num_steps=2)
    want = jax.eval_shape(lambda: linen.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
    got = net.linen_variables()
    assert jax.tree.structure(got) == jax.tree.structure(dict(want))
    chex.assert_trees_all_equal_shapes(got, dict(want))
    with pytest.raises(TypeError, match="flax.linen.Module"):
        anx.Network(net, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("method", ["anode", "anodev2"])
def test_network_training_step_equals_the_linen_trainer_step(method):
    """One step of the Linen trainer (`anode_jax.training`: model, optimizer, state and step
    from the config) and the same step from NNX (`nnx.Optimizer` with the trainer's optax
    transform, the trainer's preprocessing) give the same parameters, statistics,
    optimizer state and loss (float32 round-off)."""
    from anode_jax import training
    from anode_jax.data.augment import preprocess
    from anode_jax.training.steps import make_train_step

    config = training.get_config("default")  # the digits network, AdamW, cosine schedule
    config.model.width = 0.25
    config.model.method = method
    num_classes, image_shape = 10, (8, 8, 1)
    linen = training.build_model(config, num_classes)
    schedule = training.make_lr_schedule(config, steps_per_epoch=10)
    tx = training.make_optimizer(config, schedule)
    state = training.create_train_state(linen, tx, seed=0, image_shape=image_shape)
    norm = dict(pixel_scale=1.0 / 16.0, mean=(0.5,), std=(0.5,))
    step = jax.jit(make_train_step(linen, tx, augment=False, schedule=schedule, **norm))
    images = jnp.asarray(np.random.default_rng(0).integers(0, 17, (16, 8, 8, 1)), jnp.uint8)
    labels = jnp.asarray(np.arange(16) % 10, jnp.int32)
    new_state, metrics = step(state, images, labels)

    net = anx.Network(linen, input_shape=image_shape, rngs=nnx.Rngs(0))
    net.load_linen_variables({"params": state.params, "batch_stats": state.batch_stats})
    optimizer = nnx.Optimizer(net, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(net, optimizer, images, labels):
        x = preprocess(images, key=None, crop_pad=0, flip=False, **norm)

        def loss_fn(net):
            logits = net(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(net)
        optimizer.update(net, grads)
        return loss

    loss = nnx_step(net, optimizer, images, labels)
    chex.assert_trees_all_close(loss, metrics["loss"], rtol=1e-5)
    got = net.linen_variables()
    chex.assert_trees_all_close(got["params"], new_state.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got["batch_stats"], new_state.batch_stats, rtol=1e-5, atol=1e-6)
    opt_leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(optimizer, nnx.OptState)))
    want_leaves = [a for a in jax.tree.leaves(new_state.opt_state) if jnp.ndim(a) > 0]
    got_leaves = [a for a in opt_leaves if jnp.ndim(a) > 0]
    assert len(got_leaves) == len(want_leaves) > 0
    assert sorted(float(jnp.sum(jnp.abs(a))) for a in got_leaves) == pytest.approx(
        sorted(float(jnp.sum(jnp.abs(a))) for a in want_leaves), rel=1e-5
    )
