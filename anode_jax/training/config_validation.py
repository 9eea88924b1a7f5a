"""Config validation, run before any data loading or compilation.

Every problem raises :class:`ConfigError` with a one-line message that names the key,
the bad value and the valid choices.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from anode_jax.data import DATASET_NAMES as DATASETS
from anode_jax.models import MODEL_NAMES, NORM_NAMES, Q_NAMES
from anode_jax.ode import ADJOINTS, SOLVERS, get_solver
from anode_jax.ode import solver_names as _core_solver_names
from anode_jax.training.configs import METHODS, base_config
from anode_jax.training.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "constant")
NORMS = NORM_NAMES

_ADJOINT_RE = re.compile(
    "^(" + "|".join(a for a in ADJOINTS if a != "checkpointed") + r"|checkpointed(:[1-9][0-9]*)?)$"
)
ADJOINT_CHOICES = (
    "direct, anode, backsolve, checkpointed:K (K >= 1), reversible (with a reversible solver: "
    "reversible:<base>, reversible_heun or alf)"
)


def model_names() -> tuple[str, ...]:
    return tuple(MODEL_NAMES)


def q_names() -> tuple[str, ...]:
    return tuple(Q_NAMES)


def norm_names() -> tuple[str, ...]:
    return tuple(NORM_NAMES)


def solver_names() -> tuple[str, ...]:
    """The core's solver names, the Runge-Kutta tableaux first (in `anode_jax.ode.SOLVERS` order)."""
    return tuple(SOLVERS) + tuple(n for n in _core_solver_names() if n not in SOLVERS)


def _is_reversible_solver(name: str) -> bool:
    return bool(get_solver(name).reversible)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, (Mapping, ml_collections.ConfigDict)):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def flat_config(config) -> dict[str, Any]:
    """`{"model.name": "resnet", ...}`, tuples as lists (the JSON form checkpoints store)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in _flatten(config).items()}


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(
            f"config.{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}"
        )


def _int(key: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config.{key}={value!r} must be an integer >= {minimum}")
    if value < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ConfigError(f"config.{key}={value} must be {what}")


def _number(key: str, value: Any, *, positive: bool = False, nonneg: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.{key}={value!r} must be a number")
    if positive and not value > 0:
        raise ConfigError(f"config.{key}={value} must be positive")
    if nonneg and value < 0:
        raise ConfigError(f"config.{key}={value} must be >= 0")


def check_known_keys(keys) -> None:
    """Raise ConfigError if any dotted key (e.g. ``"model.solvr"``) is not in the schema."""
    schema = _flatten(base_config())
    unknown = sorted(set(keys) - set(schema))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join('config.' + k for k in unknown)}; valid keys: "
            f"{', '.join(sorted(schema))}"
        )


def validate_config(
    config: ml_collections.ConfigDict | Mapping[str, Any], num_devices: int | None = None
) -> None:
    """Raise :class:`ConfigError` for the first problem found in ``config``.

    ``num_devices``: devices the batch is split over (default: from ``config.num_devices``
    and ``jax.device_count()``).
    """
    flat = _flatten(config)
    schema = _flatten(base_config())
    check_known_keys(flat)
    missing = sorted(set(schema) - set(flat))
    if missing:
        raise ConfigError(
            f"config is missing key(s) {', '.join('config.' + k for k in missing)}; start config "
            "files from anode_jax.training.configs.base_config()"
        )
    for key in (
        "data.augment",
        "data.flip",
        "progress_bar",
        "plots",
        "tensorboard",
        "distributed",
        "optim.nesterov",
    ):
        if not isinstance(flat[key], bool):
            raise ConfigError(f"config.{key}={flat[key]!r} must be True or False")
    for key in (
        "data.dir",
        "data.name",
        "model.name",
        "model.method",
        "model.solver",
        "model.adjoint",
        "model.q",
        "model.norm",
        "optim.name",
        "optim.schedule",
    ):
        if not isinstance(flat[key], str):
            raise ConfigError(f"config.{key}={flat[key]!r} must be a string")

    _choice("data.name", flat["data.name"], DATASETS)
    _choice("model.name", flat["model.name"], model_names())
    _choice("model.method", flat["model.method"], METHODS)
    _choice("model.solver", flat["model.solver"], solver_names())
    adjoint = flat["model.adjoint"]
    if not _ADJOINT_RE.match(adjoint):
        raise ConfigError(
            f"config.model.adjoint={adjoint!r} is not valid; choose one of: {ADJOINT_CHOICES}"
        )
    method = flat["model.method"]
    if (method == "backsolve") != (adjoint == "backsolve"):
        if method == "backsolve":
            raise ConfigError(
                f"config.model.method='backsolve' needs config.model.adjoint='backsolve' "
                f"(got {adjoint!r}); to use another adjoint choose method anode or anodev2"
            )
        raise ConfigError(
            f"config.model.adjoint='backsolve' is the Neural ODE adjoint: use it with "
            f"config.model.method='backsolve' (got method {method!r}); valid adjoints for "
            f"{method}: direct, anode, checkpointed:K"
        )
    if adjoint == "reversible" and not _is_reversible_solver(flat["model.solver"]):
        raise ConfigError(
            f"config.model.adjoint='reversible' needs a reversible config.model.solver "
            f"(got {flat['model.solver']!r}); choose one of: "
            + ", ".join(n for n in solver_names() if _is_reversible_solver(n))
        )
    _choice("model.q", flat["model.q"], q_names())
    _choice("model.norm", flat["model.norm"], norm_names())
    _choice("optim.name", flat["optim.name"], OPTIMIZERS)
    _choice("optim.schedule", flat["optim.schedule"], SCHEDULES)

    _int("seed", flat["seed"], minimum=0)
    for key in (
        "batch_size",
        "eval_batch_size",
        "num_epochs",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "log_every_steps",
        "eval_every_epochs",
        "model.num_steps",
    ):
        _int(key, flat[key], minimum=1)
    for key in ("data.train_size", "data.test_size", "data.crop_padding", "num_devices"):
        _int(key, flat[key], minimum=0)
    _number("model.width", flat["model.width"], positive=True)
    _number("optim.learning_rate", flat["optim.learning_rate"], positive=True)
    for key in (
        "optim.momentum",
        "optim.weight_decay",
        "optim.warmup_epochs",
        "optim.grad_clip_norm",
        "optim.b1",
        "optim.b2",
    ):
        _number(key, flat[key], nonneg=True)
    _number("optim.lr_gamma", flat["optim.lr_gamma"], positive=True)
    milestones = flat["optim.lr_milestones"]
    if (
        not isinstance(milestones, (tuple, list))
        or not all(
            isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0 for m in milestones
        )
        or list(milestones) != sorted(milestones)
    ):
        raise ConfigError(
            f"config.optim.lr_milestones={milestones!r} must be increasing positive epochs, "
            "e.g. (150, 250)"
        )
    if flat["data.train_size"] and flat["data.train_size"] < flat["batch_size"]:
        raise ConfigError(
            f"config.data.train_size={flat['data.train_size']} is smaller than "
            f"config.batch_size={flat['batch_size']}: no full training batch"
        )

    if num_devices is None:
        import jax

        available = jax.device_count()
        requested = flat["num_devices"]
        if requested > available:
            raise ConfigError(
                f"config.num_devices={requested} but only {available} device(s) are visible "
                f"({jax.default_backend()}); use 0 for all"
            )
        num_devices = requested or available
    for key in ("batch_size", "eval_batch_size"):
        if flat[key] % num_devices:
            raise ConfigError(
                f"config.{key}={flat[key]} is not divisible by the {num_devices} devices it is "
                f"split over; use a multiple of {num_devices} (or set config.num_devices)"
            )


# `model_kwargs` moved to `anode_jax.training.train_state`, beside the model it builds.
from anode_jax.training.train_state import model_kwargs  # noqa: E402,F401
