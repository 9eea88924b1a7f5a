"""Config validation, run before any data is read, anything is compiled or written.

One pass over `FIELDS`, which knows each key's type and valid range (finite numbers only;
upper bounds where the program has a limit: int32 step counters, the image size, the test
split), then the checks between keys. Every problem raises `ConfigError` with a one-line
message naming the key, the bad value and the valid choices or range. Settings that the
chosen dataset, model or optimizer ignores are returned as one-line notes.

The lists of valid names come from the packages that define them (`anode_jax.models`,
`anode_jax.data`, `anode_jax.ode`); this module keeps no copy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from anode_jax.data import DATASET_NAMES, IMAGE_SHAPES, TEST_SPLIT_SIZES
from anode_jax.models import MODEL_NAMES, NORM_NAMES, Q_NAMES
from anode_jax.ode import ADJOINTS, SOLVERS, get_solver
from anode_jax.ode import solver_names as _core_solver_names
from anode_jax.training.configs import METHODS, base_config
from anode_jax.training.errors import ConfigError

DATASETS = DATASET_NAMES
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "constant")
NORMS = NORM_NAMES

#: Largest count the trainer can represent: the step counter of the jitted state is int32.
INT32_MAX = 2**31 - 1
#: Seeds are drawn into `jax.random.key` (uint32 key data) and numpy generators.
SEED_MAX = 2**32 - 1
#: Solver steps per ODE block: the papers use 1-32; beyond this a step hangs, not trains.
MAX_NUM_STEPS = 10_000
#: Channel multiplier: below 1/32 the narrowest layers of every network collapse to one
#: channel (`scaled_channels` rounds to at least 1); above 16 the widest layer has 8192.
WIDTH_RANGE = (1 / 32, 16.0)

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


@dataclasses.dataclass(frozen=True)
class Field:
    """What one config key may hold.

    `kind`: "bool", "int", "float", "str" or "milestones". Numbers lie in [`lo`, `hi`]
    (`hi_open`: [`lo`, `hi`); `lo_open`: (`lo`, ...)); `choices` lists valid strings.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: Callable[[], tuple[str, ...]] | None = None

    def describe(self, finite: bool = False) -> str:
        """E.g. "an integer in [1, 2147483647]", "a number in [0, 1)", "a number > 0"."""
        if self.kind == "int":
            return f"an integer in [{self.lo}, {self.hi}]"
        what = "a finite number" if finite else "a number"
        if self.hi is None:
            return f"{what} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"{what} in {left}{_num(self.lo)}, {_num(self.hi)}{right}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _count(lo: int, hi: int = INT32_MAX) -> Field:
    return Field("int", lo, hi)


UNIT = Field("float", 0.0, 1.0, hi_open=True)  # momentum, Adam's betas
POSITIVE = Field("float", 0.0, None, lo_open=True)
NONNEG = Field("float", 0.0, None)

#: Every key of `base_config` with its type and range (the schema's other half).
FIELDS: dict[str, Field] = {
    "seed": _count(0, SEED_MAX),
    "batch_size": _count(1),
    "eval_batch_size": _count(1),
    "num_epochs": _count(1),
    "checkpoint_every_steps": _count(1),
    "keep_checkpoints": _count(1),
    "log_every_steps": _count(1),
    "eval_every_epochs": _count(1),
    "progress_bar": Field("bool"),
    "plots": Field("bool"),
    "tensorboard": Field("bool"),
    "distributed": Field("bool"),
    "num_devices": _count(0),
    "data.name": Field("str", choices=lambda: DATASETS),
    "data.dir": Field("str"),
    "data.train_size": _count(0),
    "data.test_size": _count(0),
    "data.augment": Field("bool"),
    "data.crop_padding": _count(0),
    "data.flip": Field("bool"),
    "model.name": Field("str", choices=model_names),
    "model.method": Field("str", choices=lambda: METHODS),
    "model.num_steps": _count(1, MAX_NUM_STEPS),
    "model.solver": Field("str", choices=solver_names),
    "model.adjoint": Field("str"),
    "model.q": Field("str", choices=q_names),
    "model.norm": Field("str", choices=norm_names),
    "model.width": Field("float", *WIDTH_RANGE),
    "optim.name": Field("str", choices=lambda: OPTIMIZERS),
    "optim.learning_rate": POSITIVE,
    "optim.momentum": UNIT,
    "optim.nesterov": Field("bool"),
    "optim.b1": UNIT,
    "optim.b2": UNIT,
    "optim.weight_decay": NONNEG,
    "optim.schedule": Field("str", choices=lambda: SCHEDULES),
    "optim.lr_milestones": Field("milestones"),
    "optim.lr_gamma": POSITIVE,
    "optim.warmup_epochs": NONNEG,
    "optim.grad_clip_norm": NONNEG,
}

#: (key, applies(flat config), the condition under which it is ignored): a key whose value
#: differs from `base_config`'s while it does not apply is reported as a note.
_APPLIES: tuple[tuple[str, Callable[[dict], bool], str], ...] = (
    ("optim.momentum", lambda f: f["optim.name"] == "sgd", "optim.name='{optim.name}'"),
    ("optim.nesterov", lambda f: f["optim.name"] == "sgd", "optim.name='{optim.name}'"),
    ("optim.b1", lambda f: f["optim.name"] == "adamw", "optim.name='{optim.name}'"),
    ("optim.b2", lambda f: f["optim.name"] == "adamw", "optim.name='{optim.name}'"),
    (
        "optim.lr_milestones",
        lambda f: f["optim.schedule"] == "step",
        "optim.schedule='{optim.schedule}'",
    ),
    (
        "optim.lr_gamma",
        lambda f: f["optim.schedule"] == "step",
        "optim.schedule='{optim.schedule}'",
    ),
    ("data.crop_padding", lambda f: f["data.augment"], "data.augment=False"),
    ("data.flip", lambda f: f["data.augment"], "data.augment=False"),
    ("model.q", lambda f: f["model.method"] == "anodev2", "model.method='{model.method}'"),
    ("model.adjoint", lambda f: f["model.method"] != "baseline", "model.method='baseline'"),
    ("model.solver", lambda f: f["model.method"] != "baseline", "model.method='baseline'"),
    ("model.num_steps", lambda f: f["model.method"] != "baseline", "model.method='baseline'"),
)

#: Variables that describe a cluster to `jax.distributed.initialize` (besides the JAX_ trio):
#: SLURM, Open MPI / PMI(x), Cloud TPU pods, Kubernetes.
CLUSTER_VARIABLES = (
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_MCA_orte_hnp_uri",
    "PMI_SIZE",
    "PMIX_RANK",
    "TPU_WORKER_HOSTNAMES",
    "CLOUD_TPU_TASK_ID",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "KUBERNETES_SERVICE_HOST",
)
JAX_CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_field(key: str, value: Any) -> None:
    """Raise `ConfigError` unless `value` has the type and range of `FIELDS[key]`."""
    f = FIELDS[key]
    if f.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"config.{key}={value!r} must be True or False")
    elif f.kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"config.{key}={value!r} must be a string")
        if f.choices is not None and value not in f.choices():
            raise ConfigError(
                f"config.{key}={value!r} is not valid; choose one of: {', '.join(f.choices())}"
            )
    elif f.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config.{key}={value!r} must be {f.describe()}")
        if value < f.lo:
            what = "positive" if f.lo == 1 else f">= {f.lo}"
            raise ConfigError(f"config.{key}={value} must be {what} ({f.describe()})")
        if value > f.hi:
            raise ConfigError(f"config.{key}={value} must be {f.describe()}")
    elif f.kind == "float":
        if not _is_number(value):
            raise ConfigError(f"config.{key}={value!r} must be {f.describe()}")
        if not math.isfinite(value):
            raise ConfigError(f"config.{key}={value} must be {f.describe(finite=True)}")
        below = value <= f.lo if f.lo_open else value < f.lo
        above = f.hi is not None and (value >= f.hi if f.hi_open else value > f.hi)
        if below and f.lo == 0 and f.lo_open:
            raise ConfigError(f"config.{key}={value} must be positive")
        if below and f.lo == 0:
            raise ConfigError(f"config.{key}={value} must be >= 0 ({f.describe()})")
        if value <= 0 and f.lo > 0:
            raise ConfigError(f"config.{key}={value} must be positive ({f.describe()})")
        if below or above:
            raise ConfigError(f"config.{key}={value} must be {f.describe()}")
    elif f.kind == "milestones":
        ok = isinstance(value, (tuple, list)) and all(_is_number(m) for m in value)
        if ok and not all(math.isfinite(m) for m in value):
            raise ConfigError(f"config.{key}={value!r} must hold finite epochs, e.g. (150, 250)")
        if not ok or not all(m > 0 for m in value) or list(value) != sorted(value):
            raise ConfigError(
                f"config.{key}={value!r} must be increasing positive epochs, e.g. (150, 250)"
            )


def check_override(key: str, text: str) -> None:
    """Check the text of a command-line override `--config.KEY=TEXT` against the key's type,
    in the project's one-line wording (absl's own is two lines of Python's `int()` errors).
    Ranges are checked later, on the parsed config; `key` must be known."""
    f = FIELDS[key]
    t = text.strip()
    if f.kind == "int" and not re.fullmatch(r"[+-]?[0-9](_?[0-9])*", t):
        raise ConfigError(f"config.{key}={text!r} must be {f.describe()}")
    if f.kind == "float":
        try:
            float(t)
        except ValueError:
            raise ConfigError(f"config.{key}={text!r} must be {f.describe()}") from None
    if f.kind == "bool" and t.lower() not in ("true", "false", "t", "f", "1", "0"):
        raise ConfigError(f"config.{key}={text!r} must be true or false")


def check_known_keys(keys) -> None:
    """Raise ConfigError if any dotted key (e.g. `"model.solvr"`) is not in the schema."""
    schema = _flatten(base_config())
    unknown = sorted(set(keys) - set(schema))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join('config.' + k for k in unknown)}; valid keys: "
            f"{', '.join(sorted(schema))}"
        )


def check_distributed_environment(environ: Mapping[str, str] | None = None) -> None:
    """Raise `ConfigError` (one line naming what to set) unless the environment describes a
    cluster that `jax.distributed.initialize` can join: the three `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` together, or one of `CLUSTER_VARIABLES`."""
    env = os.environ if environ is None else environ
    given = [k for k in JAX_CLUSTER_VARIABLES if env.get(k, "").strip()]
    if given and len(given) < len(JAX_CLUSTER_VARIABLES):
        missing = [k for k in JAX_CLUSTER_VARIABLES if k not in given]
        raise ConfigError(
            f"config.distributed=True needs {', '.join(JAX_CLUSTER_VARIABLES)} together; "
            f"missing {', '.join(missing)}"
        )
    if given or any(env.get(k) for k in CLUSTER_VARIABLES):
        return
    raise ConfigError(
        "config.distributed=True but no cluster is described: set JAX_COORDINATOR_ADDRESS="
        "host:port (process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID in every process (python "
        "-m anode_jax.launch does), or run under SLURM, mpirun or a TPU pod; on one machine "
        "leave config.distributed=False"
    )


def validate_config(
    config: ml_collections.ConfigDict | Mapping[str, Any], num_devices: int | None = None
) -> list[str]:
    """Raise `ConfigError` for the first problem found in `config`; return one-line notes
    about settings that the chosen dataset, model or optimizer ignores.

    `num_devices`: devices the batch is split over (default: from `config.num_devices`
    and `jax.device_count()`).
    """
    flat = _flatten(config)
    schema = _flatten(base_config())
    check_known_keys(flat)
    missing = sorted(set(schema) - set(flat))
    if missing:
        raise ConfigError(
            f"config is missing key(s) {', '.join('config.' + k for k in missing)}; start config "
            "files from anode_jax.training.base_config()"
        )
    for key in FIELDS:
        check_field(key, flat[key])
    _check_relations(flat)
    if flat["distributed"]:
        check_distributed_environment()
    _check_devices(flat, num_devices)
    return _notes(flat, schema)


def _check_relations(flat: dict[str, Any]) -> None:
    adjoint, method, solver = flat["model.adjoint"], flat["model.method"], flat["model.solver"]
    if not _ADJOINT_RE.match(adjoint):
        raise ConfigError(
            f"config.model.adjoint={adjoint!r} is not valid; choose one of: {ADJOINT_CHOICES}"
        )
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
    if adjoint == "reversible" and not _is_reversible_solver(solver):
        raise ConfigError(
            f"config.model.adjoint='reversible' needs a reversible config.model.solver "
            f"(got {solver!r}); choose one of: "
            + ", ".join(n for n in solver_names() if _is_reversible_solver(n))
        )
    data = flat["data.name"]
    if data == "digits" and flat["data.dir"]:
        raise ConfigError(
            f"config.data.dir={flat['data.dir']!r} does not apply to config.data.name='digits' "
            "(the digits ship with scikit-learn); leave it empty or choose cifar10 or cifar100"
        )
    size = IMAGE_SHAPES[data][0]
    if flat["data.crop_padding"] >= size:
        raise ConfigError(
            f"config.data.crop_padding={flat['data.crop_padding']} must be below the image "
            f"size {size} of {data} (an integer in [0, {size - 1}])"
        )
    test_split = TEST_SPLIT_SIZES[data]
    if flat["eval_batch_size"] > test_split:
        raise ConfigError(
            f"config.eval_batch_size={flat['eval_batch_size']} exceeds the {test_split} images "
            f"of the {data} test split (an integer in [1, {test_split}])"
        )
    if flat["optim.warmup_epochs"] > flat["num_epochs"]:
        raise ConfigError(
            f"config.optim.warmup_epochs={flat['optim.warmup_epochs']} must be at most "
            f"config.num_epochs={flat['num_epochs']} (a number in [0, {flat['num_epochs']}])"
        )
    if flat["data.train_size"] and flat["data.train_size"] < flat["batch_size"]:
        raise ConfigError(
            f"config.data.train_size={flat['data.train_size']} is smaller than "
            f"config.batch_size={flat['batch_size']}: no full training batch"
        )


def _check_devices(flat: dict[str, Any], num_devices: int | None) -> None:
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


def _notes(flat: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    def same(a, b):
        return tuple(a) == tuple(b) if isinstance(a, (tuple, list)) else a == b

    notes = []
    for key, applies, because in _APPLIES:
        if not applies(flat) and not same(flat[key], schema[key]):
            reason = re.sub(r"\{([a-z_.]+)\}", lambda m: str(flat[m.group(1)]), because)
            notes.append(f"config.{key}={flat[key]!r} has no effect with config.{reason}")
    return notes


def divergence_hints(config) -> list[str]:
    """Hyperparameters outside their usual range, named in the message of a NaN stop.

    Usual ranges (the recipes in `configs.py` and common practice): SGD learning rate <= 1,
    AdamW <= 0.01, momentum and betas <= 0.99 / 0.9999, weight decay <= 0.01, lr_gamma <= 1
    (a step schedule that grows the rate), warmup below the run.
    """
    flat = _flatten(config)
    lr_max = 1.0 if flat["optim.name"] == "sgd" else 0.01
    checks = [
        ("optim.learning_rate", lambda v: v <= lr_max, f"usual <= {lr_max}"),
        ("optim.lr_gamma", lambda v: v <= 1, "usual <= 1"),
        ("optim.weight_decay", lambda v: v <= 0.01, "usual <= 0.01"),
    ]
    if flat["optim.name"] == "sgd":
        checks.append(("optim.momentum", lambda v: v <= 0.99, "usual <= 0.99"))
    else:
        checks.append(("optim.b1", lambda v: v <= 0.99, "usual <= 0.99"))
        checks.append(("optim.b2", lambda v: v <= 0.9999, "usual <= 0.9999"))
    out = []
    for key, ok, usual in checks:
        v = flat[key]
        if not (_is_number(v) and math.isfinite(v) and ok(v)):
            out.append(f"config.{key}={v} ({usual})")
    return out


# `model_kwargs` moved to `anode_jax.training.train_state`, beside the model it builds.
from anode_jax.training.train_state import model_kwargs  # noqa: E402,F401
