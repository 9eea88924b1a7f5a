"""A restricted unpickler for the CIFAR "python version" files.

The official CIFAR archives are pickles. Unpickling an untrusted pickle with
`pickle` can run arbitrary code (any importable callable can be invoked
through `GLOBAL`/`REDUCE`), so the loaders use `safe_load`, which admits
only builtin containers and scalars (handled by pickle opcodes, no globals needed)
plus the handful of numpy helpers that rebuild a plain `ndarray`. Any other
global (`os.system`, `builtins.eval`, `subprocess.Popen` ...) is refused
*before* it is looked up, so nothing in the payload runs.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, BinaryIO

from anode_jax.data.errors import DataError

# (module, name) pairs that may appear in a GLOBAL / STACK_GLOBAL opcode.
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(m, "_reconstruct") for m in _NUMPY_MODULES]
    + [(m, "scalar") for m in _NUMPY_MODULES]
    # pickle protocol 5 rebuilds contiguous arrays from a buffer.
    + [("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")]
    + [
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python-3 pickles of `bytes` at protocol <= 2 go through _codecs.encode,
        # a pure function returning bytes.
        ("_codecs", "encode"),
        # Builtin containers and scalars that have no dedicated opcode (protocol <= 2
        # pickles an empty array's buffer as `bytes()`).
        ("builtins", "bytes"),
        ("__builtin__", "bytes"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("builtins", "complex"),
        ("__builtin__", "set"),
        ("__builtin__", "frozenset"),
        ("__builtin__", "bytearray"),
        ("__builtin__", "complex"),
    ]
)
_NUMPY_DTYPE_MODULES = ("numpy", "numpy.dtypes")


class UnsafePickleError(DataError):
    """The pickle references a global outside the allowlist."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, *, source: str):
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in ALLOWED_GLOBALS
        # numpy >= 1.25 pickles dtypes as e.g. numpy.dtypes.UInt8DType; admit those classes.
        if not allowed and module in _NUMPY_DTYPE_MODULES and name.endswith("DType"):
            allowed = True
        if not allowed:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle global '{module}.{name}'; only builtin "
                "containers/scalars and numpy arrays are allowed in CIFAR python-version files "
                "(the file is not an official CIFAR batch and may be malicious)"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:  # pragma: no cover - never in CIFAR files
        raise UnsafePickleError(f"{self._source}: refusing persistent id in pickle")


def safe_loads(data: bytes, *, source: str = "<bytes>") -> Any:
    """Unpickle `data` with the restricted unpickler (`encoding='bytes'`)."""
    return _load(io.BytesIO(data), source)


def safe_load(path: str | os.PathLike[str]) -> Any:
    """Unpickle the file at `path` with the restricted unpickler."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        return _load(f, path)


def _load(f: BinaryIO, source: str) -> Any:
    try:
        return _RestrictedUnpickler(f, source=source).load()
    except DataError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
        OverflowError,
        UnicodeDecodeError,
        ImportError,
    ) as e:
        raise DataError(
            f"{source}: not a readable pickle (truncated or corrupt: {type(e).__name__}: {e})"
        ) from None
