"""Part 1 of the reproduction: gradient consistency of backsolve vs the exact strategies.

`run_gradients` (the papers' gradient-error figure on single ODE blocks, resumable),
`plot_gradients`, and `network_gradients` (backsolve's error on the training gradient of
the table's networks at initialization).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import numpy as np

from benchmarks.reproduction.common import ANCHOR_GRAD, ANCHOR_GRAD_X3, RESULTS
from benchmarks.reproduction.table import TABLE_MODELS, run_config

GRAD_FIELDS = ("resnet", "sqnxt", "convrelu")
GRAD_SOLVERS = ("euler", "midpoint", "rk4")
GRAD_NTS = (1, 2, 4, 8, 16, 32)
GRAD_DTYPES = ("float32", "float64")
GRAD_SCALES = (1.0, 3.0)
EXACT_STRATEGIES = ("anode", "checkpointed:2")
ALL_STRATEGIES = ("backsolve", *EXACT_STRATEGIES)


@dataclasses.dataclass(frozen=True)
class GradSetup:
    """Shape of the gradient-consistency problem: z0 ~ N(0, 1) of (batch, size, size, channels)."""

    batch: int = 4
    size: int = 8
    channels: int = 16
    seed: int = 0
    #: cotangent v of the loss <z(1), v>: "normal" (v ~ N(0, 1)) or "ones" (loss = sum z(1))
    cotangent: str = "normal"


def _field_module(name: str, channels: int):
    import flax.linen as nn

    from anode_jax.models import ResNetVectorField, SqueezeNextVectorField

    if name == "resnet":
        return ResNetVectorField(channels, "batch")
    if name == "sqnxt":
        return SqueezeNextVectorField(channels, "batch")
    if name == "convrelu":

        class ConvReLU(nn.Module):
            """f(z) = ReLU(conv3x3(ReLU(conv3x3(z)))), no bias, no normalization."""

            channels: int

            @nn.compact
            def __call__(self, t, z, train=False):
                del t, train
                h = nn.relu(nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False)(z))
                return nn.relu(nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False)(h))

        return ConvReLU(channels)
    raise ValueError(f"unknown field {name!r}; choose one of {GRAD_FIELDS}")


def _rel(a, b) -> float:
    """||a - b|| / ||b|| over all leaves of two pytrees (computed in float64 on the host)."""
    import jax

    da = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(a)]
    db = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(b)]
    num = math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(da, db)))
    den = math.sqrt(sum(float(np.sum(y**2)) for y in db))
    return num / den if den > 0 else float("nan")


def gradient_case(
    field: str, solver: str, num_steps: int, dtype: str, scales=GRAD_SCALES, setup=GradSetup()
):
    """Relative gradient errors vs ``"direct"`` and the z(0) reconstruction error.

    The vector field runs in training mode (BatchNorm with batch statistics, as in
    training). Loss ``<z(1), v>`` with a fixed random cotangent ``v``; the gradient is
    taken w.r.t. the parameters θ and the input z(0). Returns one record per weight scale.
    """
    import jax
    import jax.numpy as jnp

    from anode_jax import odeint

    x64 = dtype == "float64"
    with jax.enable_x64(x64):
        dt = jnp.float64 if x64 else jnp.float32
        k_init, k_z, k_v = jax.random.split(jax.random.PRNGKey(setup.seed), 3)
        shape = (setup.batch, setup.size, setup.size, setup.channels)
        z0 = jax.random.normal(k_z, shape, jnp.float32).astype(dt)
        v = jax.random.normal(k_v, shape, jnp.float32).astype(dt)
        if setup.cotangent == "ones":
            v = jnp.ones(shape, dt)
        vf = _field_module(field, setup.channels)
        params0 = vf.init(k_init, jnp.zeros((), jnp.float32), z0.astype(jnp.float32))["params"]

        def f(t, z, theta):
            out = vf.apply({"params": theta}, t, z, train=True, mutable=["norm_stats"])
            return out[0]

        def solve(z, theta, adjoint):
            return odeint(
                f,
                z,
                theta,
                t0=0.0,
                t1=1.0,
                num_steps=num_steps,
                solver=solver,
                adjoint=adjoint,
                unroll=False,  # a loop: compile time independent of Nt (values are the same)
            )

        def grads(z, theta):
            out = {}
            for adjoint in ("direct", *ALL_STRATEGIES):
                loss = lambda z_, th_, a=adjoint: jnp.sum(solve(z_, th_, a) * v)
                out[adjoint] = jax.grad(loss, argnums=(0, 1))(z, theta)
            z1 = solve(z, theta, "direct")
            z0_rec = odeint(
                f,
                z1,
                theta,
                t0=1.0,
                t1=0.0,
                num_steps=num_steps,
                solver=solver,
                adjoint="direct",
                unroll=False,
            )
            return out, z0_rec

        grads_jit = jax.jit(grads)
        records = []
        for scale in scales:
            theta = jax.tree.map(lambda p, s=scale: (p * s).astype(dt), params0)
            t_start = time.perf_counter()
            out, z0_rec = jax.block_until_ready(grads_jit(z0, theta))
            ref_z, ref_theta = out["direct"]
            rec = {
                "field": field,
                "solver": solver,
                "num_steps": num_steps,
                "dtype": dtype,
                "weight_scale": scale,
                "recon_error": _rel(z0_rec, z0),
                "grad_norm_theta": math.sqrt(
                    sum(
                        float(np.sum(np.asarray(g, np.float64) ** 2))
                        for g in jax.tree.leaves(ref_theta)
                    )
                ),
                "seconds": time.perf_counter() - t_start,
            }
            for adjoint in ALL_STRATEGIES:
                g_z, g_theta = out[adjoint]
                rec[f"{adjoint}_theta"] = _rel(g_theta, ref_theta)
                rec[f"{adjoint}_z0"] = _rel(g_z, ref_z)
            records.append(rec)
        return records


def run_gradients(
    fields=GRAD_FIELDS,
    solvers=GRAD_SOLVERS,
    nts=GRAD_NTS,
    dtypes=GRAD_DTYPES,
    scales=GRAD_SCALES,
    setup=GradSetup(),
    out_dir=RESULTS,
    log=print,
    name: str = "gradients",
    live_figures: bool = True,
) -> dict[str, Any]:
    """All gradient cases; writes ``<name>.json`` (and, for the default name, the two
    figures) into ``out_dir``."""
    import jax

    from benchmarks._common import machine

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    previous = {}
    if os.path.exists(path):  # resume: keep the cases already measured with this setup
        with open(path) as f:
            old = json.load(f)
        if old.get("setup") == dataclasses.asdict(setup):
            previous = {_case_key(r): r for r in old["records"]}
    records = []
    t0 = time.perf_counter()

    def write(partial: bool) -> dict[str, Any]:
        payload = {
            "setup": dataclasses.asdict(setup),
            "strategies": list(ALL_STRATEGIES),
            "reference": "direct",
            "complete": not partial,
            "seconds_this_session": time.perf_counter() - t0,
            "machine": machine(),
            "records": records,
        }
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
        if name == "gradients" and (live_figures or not partial):  # figures so far
            plot_gradients(payload, out_dir)
        return payload

    # field-major, both dtypes of a case together: an interrupted run has whole fields done
    for field in fields:
        for solver in solvers:
            for nt in nts:
                for dtype in dtypes:
                    keys = [(field, solver, nt, dtype, float(s)) for s in scales]
                    if all(k in previous for k in keys):
                        records.extend(previous[k] for k in keys)
                        continue
                    recs = gradient_case(field, solver, nt, dtype, scales, setup)
                    records.extend(recs)
                    for r in recs:
                        log(
                            f"{field:8s} {dtype} {solver:8s} Nt={nt:2d} x{r['weight_scale']:g}: "
                            f"backsolve {r['backsolve_theta']:.3g}, anode {r['anode_theta']:.1e}, "
                            f"recon {r['recon_error']:.3g}"
                        )
                    write(partial=True)
                    jax.clear_caches()
    return write(partial=False)


def _case_key(r: dict[str, Any]) -> tuple:
    return (r["field"], r["solver"], r["num_steps"], r["dtype"], float(r["weight_scale"]))


def plot_gradients(payload: dict[str, Any], out_dir: str) -> list[str]:
    """gradient_error.png (backsolve and exact strategies vs Nt) and reconstruction.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = payload["records"]
    fields = [f for f in GRAD_FIELDS if any(r["field"] == f for r in recs)]
    scales = sorted({r["weight_scale"] for r in recs})
    colors = {"euler": "tab:blue", "midpoint": "tab:orange", "rk4": "tab:green"}
    styles = {"float32": "-", "float64": "--"}
    paths = []
    for kind in ("grad", "recon"):
        fig, axes = plt.subplots(
            len(scales),
            len(fields),
            figsize=(max(9.0, 4.2 * len(fields)), 3.4 * len(scales)),
            squeeze=False,
        )
        for i, scale in enumerate(scales):
            for j, field in enumerate(fields):
                ax = axes[i][j]
                for solver in GRAD_SOLVERS:
                    for dtype in GRAD_DTYPES:
                        rs = sorted(
                            (
                                r
                                for r in recs
                                if r["field"] == field
                                and r["solver"] == solver
                                and r["dtype"] == dtype
                                and r["weight_scale"] == scale
                            ),
                            key=lambda r: r["num_steps"],
                        )
                        if not rs:
                            continue
                        nts = [r["num_steps"] for r in rs]
                        if kind == "grad":
                            ys = [r["backsolve_theta"] for r in rs]
                            label = f"backsolve {solver} {dtype[-2:]}"
                        else:
                            ys = [r["recon_error"] for r in rs]
                            label = f"{solver} {dtype[-2:]}"
                        ax.plot(
                            nts,
                            ys,
                            styles[dtype],
                            color=colors[solver],
                            marker="o",
                            ms=3,
                            label=label,
                        )
                        if kind == "grad":
                            exact = [max(r[f"{s}_theta"] for s in EXACT_STRATEGIES) for r in rs]
                            ax.plot(
                                nts,
                                [max(e, 1e-17) for e in exact],
                                styles[dtype],
                                color="gray",
                                lw=0.8,
                                label=f"anode/checkpointed {dtype[-2:]} (0 drawn at 1e-17)"
                                if solver == "euler"
                                else None,
                            )
                if kind == "grad" and field == "resnet" and scale == 1.0:
                    for (solver, nt), val in ANCHOR_GRAD.items():
                        ax.plot(
                            nt,
                            val,
                            "x",
                            color=colors[solver],
                            ms=9,
                            mew=2,
                            label="anchor (PyTorch+torchdiffeq)"
                            if (solver, nt) == ("euler", 1)
                            else None,
                        )
                if kind == "grad" and field == "resnet" and scale == 3.0:
                    ax.plot(1, ANCHOR_GRAD_X3["euler_nt1_grad"], "x", color="tab:blue", ms=9, mew=2)
                if kind == "recon" and field == "resnet" and scale == 3.0:
                    ax.plot(
                        1, ANCHOR_GRAD_X3["euler_nt1_recon"], "x", color="tab:blue", ms=9, mew=2
                    )
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("Nt")
                ax.set_ylabel(
                    "rel. gradient error vs direct" if kind == "grad" else "rel. error of z(0)"
                )
                ax.set_title(f"{field}, weights x{scale:g}")
                ax.grid(alpha=0.3, which="both")
        handles, labels = [], []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=min(4, 2 * len(fields)), fontsize=7)
        fig.tight_layout(rect=(0, 0.14 if kind == "grad" else 0.08, 1, 1))
        name = "gradient_error.png" if kind == "grad" else "reconstruction.png"
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def network_gradients(
    data_dir: str,
    *,
    models=TABLE_MODELS,
    batch: int = 128,
    scale: str = "cpu",
    out_path: str = os.path.join(RESULTS, "network_gradients.json"),
    log=print,
    **overrides,
) -> dict[str, Any]:
    """Backsolve's error on the training gradient of the table's own networks at init.

    For each model: the ``scale``'s network (width, solver, Nt) at its seed-0
    initialization, the first ``batch`` training images (normalized, no augmentation),
    cross-entropy loss; relative error of the full parameter gradient with
    ``adjoint="backsolve"`` vs ``"anode"`` (exact), over all parameters and over the ODE
    blocks' parameters only, and the cosine between the two gradients.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from anode_jax.data import load_dataset, normalize
    from anode_jax.training import build_model

    results = {}
    if os.path.exists(out_path):
        with open(out_path) as f:
            results = json.load(f).get("models", {})
    for model_name in models:
        if model_name in results:
            continue
        c = run_config(scale, model_name, "anode", 0, data_dir, **overrides)
        ds = load_dataset("cifar10", data_dir, train_size=batch, test_size=1)
        x = normalize(
            jnp.asarray(ds.train_images[:batch]),
            pixel_scale=ds.pixel_scale,
            mean=ds.mean,
            std=ds.std,
        )
        y = jnp.asarray(ds.train_labels[:batch])
        grads = {}
        variables = None
        for adjoint in ("anode", "backsolve"):
            c.model.adjoint = adjoint
            model = build_model(c, ds.num_classes)
            if variables is None:
                variables = model.init({"params": jax.random.PRNGKey(0)}, x[:2], train=False)

            def loss_fn(params, model=model):
                logits, _ = model.apply(
                    {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
                )
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            grads[adjoint] = jax.jit(jax.grad(loss_fn))(variables["params"])
        flat = {
            k: {
                jax.tree_util.keystr(p): np.asarray(v, np.float64)
                for p, v in jax.tree_util.tree_leaves_with_path(g)
            }
            for k, g in grads.items()
        }
        ode_keys = [k for k in flat["anode"] if "vector_field" in k]
        ref, bs = flat["anode"], flat["backsolve"]
        cos = sum(float(np.sum(ref[k] * bs[k])) for k in ref) / math.sqrt(
            sum(float(np.sum(ref[k] ** 2)) for k in ref)
            * sum(float(np.sum(bs[k] ** 2)) for k in ref)
        )
        results[model_name] = {
            "width": c.model.width,
            "solver": c.model.solver,
            "num_steps": c.model.num_steps,
            "batch": batch,
            "rel_error_all": _rel([bs[k] for k in ref], [ref[k] for k in ref]),
            "rel_error_ode_blocks": _rel([bs[k] for k in ode_keys], [ref[k] for k in ode_keys]),
            "cosine": cos,
        }
        log(f"{model_name}: {results[model_name]}")
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump({"scale": scale, "models": results}, f, indent=1)
        jax.clear_caches()
    return results
