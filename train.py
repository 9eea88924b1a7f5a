"""Train (or evaluate) an ANODE model from an ml_collections config file.

    python train.py --config=configs/default.py --workdir=runs/default
    python train.py --config=configs/cifar10.py:resnet4-anode --workdir=runs/r4 \
        --config.data.dir=../shared/data/cifar10 --config.num_epochs=10
    python train.py --config=configs/default.py --workdir=runs/default --eval_only

Running the same command again resumes from the latest checkpoint in --workdir.
See docs/training.md.
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/cifar10.py:resnet4-anode.", lock_config=True
)
flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl, summary.json, plots."
)
flags.DEFINE_bool("eval_only", False, "Evaluate the latest checkpoint in --workdir and exit.")
flags.mark_flags_as_required(["config", "workdir"])


def _overrides(argv):
    """`(key, text or None)` of each --config.KEY[=TEXT] / --noconfig.KEY override in argv."""
    out = []
    args = argv[1:]
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if not arg.startswith("-"):
            continue
        name, eq, text = arg.lstrip("-").partition("=")
        if name.startswith("noconfig."):
            out.append((name[len("noconfig.") :], None))
        elif name.startswith("config."):
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
                text = args[i + 1]  # --config.KEY VALUE
            out.append((name[len("config.") :], text if eq or text else None))
    return out


def _override_keys(argv):
    """Dotted keys of --config.KEY[=VALUE] / --noconfig.KEY overrides in argv."""
    return [key for key, _ in _overrides(argv)]


def _config_file(argv):
    """The file part of --config=FILE[:ARG] (or --config FILE[:ARG]), or None."""
    args = argv[1:]
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg in ("--config", "-config") and i + 1 < len(args):
            return args[i + 1].split(":", 1)[0]
    return None


def check_command_line(argv):
    """Problems absl would report in several lines, or only after loading: one line each."""
    from anode_jax.training import ConfigError, check_known_keys, check_override

    path = _config_file(argv)
    if path is not None and not os.path.isfile(path):
        shipped = ", ".join(f"configs/{n}.py" for n in ("default", "cifar10", "cifar100"))
        raise ConfigError(
            f"--config={path}: no such config file (from {os.getcwd()}); the shipped ones "
            f"are {shipped} (the CIFAR ones take :MODEL-METHOD)"
        )
    overrides = _overrides(argv)
    check_known_keys([key for key, _ in overrides])
    for key, text in overrides:
        if text is not None:
            check_override(key, text)


def parse_flags(argv):
    """absl flag parsing, with every problem reported as one line instead of a traceback."""
    from anode_jax.training import ConfigError

    try:
        check_command_line(argv)
        rest = FLAGS(argv)
    except ConfigError as e:
        _fail(e)
    except flags.Error as e:
        root = e
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ if root.__cause__ is not None else root.__context__
        if isinstance(root, ConfigError):
            _fail(root)
        _fail(f"{' '.join(str(e).split())} (see --helpshort)")
    if len(rest) > 1:
        _fail(
            f"unexpected argument(s) {' '.join(map(repr, rest[1:]))}: train.py takes only "
            "--config, --workdir, --eval_only and --config.KEY=VALUE flags (see --helpshort)"
        )
    return rest


def _fail(e):
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def _quiet_orbax_logs(record) -> bool:
    """Orbax (and asyncio, for orbax's futures) log background failures with whole
    tracebacks. Each failure the trainer meets is reported by it as one line: a failed
    write stops training with `error: ...`, a damaged checkpoint is skipped with a line
    naming it. So their ERROR records are dropped and the rest kept to one line
    (`--verbosity=0` shows everything)."""
    if f"{os.sep}orbax{os.sep}" in record.pathname or record.name == "asyncio":
        if record.levelno >= std_logging.ERROR:
            return False
        record.msg = record.getMessage().strip().split("\n", 1)[0][:300]
        record.args = None
        record.exc_info = record.exc_text = record.stack_info = None
    return True


def _quiet_closed_loop(unraisable) -> None:
    """After an asynchronous checkpoint write fails, tensorstore may still complete futures
    of orbax's closed event loop; their "Event loop is closed" tracebacks say nothing the
    `error:` line does not."""
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def main(argv):
    if not FLAGS["verbosity"].present:
        # Orbax logs every checkpoint step at INFO; progress goes to the tqdm bar instead.
        logging.set_verbosity(logging.WARNING)
        logging.get_absl_handler().addFilter(_quiet_orbax_logs)
        sys.unraisablehook = _quiet_closed_loop
    from anode_jax.data import DataError
    from anode_jax.training import ConfigError, TrainingError, evaluate, train_and_evaluate

    try:
        if FLAGS.eval_only:
            evaluate(FLAGS.config, FLAGS.workdir)
        else:
            train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ConfigError, DataError, TrainingError) as e:
        _fail(e)
    except OSError as e:  # a filesystem fault the trainer did not anticipate: still one line
        _fail(f"{' '.join(str(e).split())} (workdir {os.path.abspath(FLAGS.workdir)})")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
