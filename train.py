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


def _override_keys(argv):
    """Dotted keys of --config.KEY[=VALUE] / --noconfig.KEY overrides in argv."""
    keys = []
    for arg in argv[1:]:
        if arg == "--":
            break
        name = arg.lstrip("-").split("=", 1)[0]
        if not arg.startswith("-"):
            continue
        for prefix in ("config.", "noconfig."):
            if name.startswith(prefix):
                keys.append(name[len(prefix) :])
    return keys


def parse_flags(argv):
    """absl flag parsing, with config problems reported as one line instead of a traceback."""
    from anode_jax.training import ConfigError
    from anode_jax.training.config_validation import check_known_keys

    try:
        check_known_keys(_override_keys(argv))
        return FLAGS(argv)
    except ConfigError as e:
        _fail(e)
    except flags.Error as e:
        root = e
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ if root.__cause__ is not None else root.__context__
        if isinstance(root, ConfigError):
            _fail(root)
        _fail(f"{e}\nPass --helpshort or --helpfull to see help on flags.")


def _fail(e):
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def _quiet_orbax_logs(record) -> bool:
    """Orbax (and asyncio, for orbax's futures) log background failures with whole
    tracebacks. Each failure the trainer meets is reported by it as one line: a failed
    write stops training with ``error: ...``, a damaged checkpoint is skipped with a line
    naming it. So their ERROR records are dropped and the rest kept to one line
    (``--verbosity=0`` shows everything)."""
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
    ``error:`` line does not."""
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
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
        _fail(f"{e} (workdir {os.path.abspath(FLAGS.workdir)})")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
