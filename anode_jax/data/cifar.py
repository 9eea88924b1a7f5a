"""CIFAR-10 / CIFAR-100 from local copies in the official layouts, or from tfds.

Local layouts (`data.dir` may name the layout folder itself or a folder holding it):

* CIFAR-10 python version `cifar-10-batches-py/`: `data_batch_1` .. `data_batch_5`,
  `test_batch` (pickled dicts with `b'data'` uint8 (N, 3072) in R, G, B planes and
  `b'labels'`) and optionally `batches.meta`. Missing `data_batch_2..5` are tolerated
  (reduced copies); `data_batch_1` and `test_batch` are required.
* CIFAR-10 binary version `cifar-10-batches-bin/`: `data_batch_1.bin` ..
  `data_batch_5.bin`, `test_batch.bin`; records of 1 label byte + 3072 pixel bytes.
* CIFAR-100 python version `cifar-100-python/`: `train`, `test` (`b'data'`,
  `b'fine_labels'`, `b'coarse_labels'`), optionally `meta`.
* CIFAR-100 binary version `cifar-100-binary/`: `train.bin`, `test.bin`; records of
  coarse label byte + fine label byte + 3072 pixel bytes.

Pickles are read with `anode_jax.data.safe_load`, never plain pickle.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from anode_jax.data.base import Dataset
from anode_jax.data.errors import DataError
from anode_jax.data.safe_pickle import safe_load

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGE_BYTES = 32 * 32 * 3


@dataclasses.dataclass(frozen=True)
class _Layout:
    dataset: str
    kind: str  # "python" | "binary"
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    required_train: int  # how many of train_files must exist (leading ones)
    num_classes: int

    def describe(self) -> str:
        files = list(self.train_files)
        if len(files) > 2:
            files = [files[0], "...", files[-1]]
        return f"{self.kind} version {self.folder}/{{{','.join(files + [self.test_file])}}}"


_LAYOUTS: dict[str, tuple[_Layout, ...]] = {
    "cifar10": (
        _Layout(
            "cifar10",
            "python",
            "cifar-10-batches-py",
            tuple(f"data_batch_{i}" for i in range(1, 6)),
            "test_batch",
            1,
            10,
        ),
        _Layout(
            "cifar10",
            "binary",
            "cifar-10-batches-bin",
            tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
            "test_batch.bin",
            1,
            10,
        ),
    ),
    "cifar100": (
        _Layout("cifar100", "python", "cifar-100-python", ("train",), "test", 1, 100),
        _Layout("cifar100", "binary", "cifar-100-binary", ("train.bin",), "test.bin", 1, 100),
    ),
}


def expected_layouts(name: str) -> str:
    return " or ".join(layout.describe() for layout in _LAYOUTS[name])


def resolve_layout(name: str, data_dir: str) -> tuple[_Layout, str]:
    """Find which official layout `data_dir` holds; returns (layout, folder)."""
    if name not in _LAYOUTS:
        raise DataError(f"no local layout for dataset '{name}'; valid: {sorted(_LAYOUTS)}")
    path = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.isdir(path):
        raise DataError(
            f"data.dir '{data_dir}' is not a directory; expected a folder holding "
            f"{expected_layouts(name)}"
        )
    layouts = _LAYOUTS[name]
    # 1. The folder itself is the layout (by name or by content).
    for layout in layouts:
        if os.path.basename(path) == layout.folder:
            return layout, path
    for layout in layouts:
        if os.path.exists(os.path.join(path, layout.test_file)) or os.path.exists(
            os.path.join(path, layout.train_files[0])
        ):
            return layout, path
    # 2. The folder holds the layout folder.
    for layout in layouts:
        sub = os.path.join(path, layout.folder)
        if os.path.isdir(sub):
            return layout, sub
    raise DataError(
        f"data.dir '{data_dir}' holds no {name} data; expected {expected_layouts(name)} "
        f"(data.dir may name that folder or the folder holding it)"
    )


def load_cifar_local(name: str, data_dir: str) -> Dataset:
    layout, folder = resolve_layout(name, data_dir)
    train_paths = []
    for i, fname in enumerate(layout.train_files):
        p = os.path.join(folder, fname)
        if os.path.exists(p):
            train_paths.append(p)
        elif i < layout.required_train:
            raise _missing(p, layout)
    test_path = os.path.join(folder, layout.test_file)
    if not os.path.exists(test_path):
        raise _missing(test_path, layout)

    reader = _read_python if layout.kind == "python" else _read_binary
    parts = [reader(p, layout) for p in train_paths]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = reader(test_path, layout)
    class_names = _class_names(folder, layout)
    return Dataset(
        name=name,
        train_images=x_tr,
        train_labels=y_tr,
        test_images=x_te,
        test_labels=y_te,
        num_classes=layout.num_classes,
        pixel_scale=1.0 / 255.0,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        source=f"{folder} ({layout.kind} version)",
        class_names=class_names,
    )


def _missing(path: str, layout: _Layout) -> DataError:
    return DataError(f"{path}: file not found; expected {layout.dataset} {layout.describe()}")


def _bad(path: str, layout: _Layout, problem: str) -> DataError:
    return DataError(
        f"{path}: {problem}; expected an official {layout.dataset} {layout.kind}-version file "
        f"({layout.describe()})"
    )


def _planes_to_nhwc(flat: np.ndarray) -> np.ndarray:
    n = flat.shape[0]
    return np.ascontiguousarray(flat.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))


def _read_python(path: str, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    try:
        obj = safe_load(path)
    except OSError as e:
        raise _bad(path, layout, f"cannot read ({e.strerror or e})") from None
    if not isinstance(obj, dict):
        raise _bad(path, layout, f"unpickled a {type(obj).__name__}, not a dict")
    obj = {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}
    label_key = b"labels" if layout.dataset == "cifar10" else b"fine_labels"
    for key in (b"data", label_key):
        if key not in obj:
            raise _bad(path, layout, f"missing key {key!r} (has {sorted(map(repr, obj))})")
    data = obj[b"data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != IMAGE_BYTES
    ):
        desc = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise _bad(path, layout, f"b'data' is a {desc}, expected uint8 (N, {IMAGE_BYTES})")
    labels = _integer_labels(obj[label_key])
    if labels is None:
        raise _bad(path, layout, f"{label_key!r} is not a list of integers")
    raw = obj[label_key]
    if isinstance(raw, (list, tuple)) and raw and (min(raw) < 0 or max(raw) >= layout.num_classes):
        # Python integers: a label beyond int64 is named with its own value.
        raise _bad(
            path,
            layout,
            f"labels outside [0, {layout.num_classes}) (min {min(raw)}, max {max(raw)}; "
            "corrupt file?)",
        )
    if labels.shape != (data.shape[0],):
        raise _bad(
            path, layout, f"{label_key!r} has shape {labels.shape}, expected ({data.shape[0]},)"
        )
    _check_labels(path, layout, labels)
    return _planes_to_nhwc(data), labels.astype(np.int32)


def _integer_labels(raw) -> np.ndarray | None:
    """Labels as int64, or `None` unless they are integers (a list of ints or an integer
    array, as in the official files): floats, strings and bools are not labels, and an
    integer beyond int64 is reported by the range check, not as an overflow."""
    if isinstance(raw, np.ndarray):
        return raw.astype(np.int64) if raw.dtype.kind in "iu" and raw.ndim == 1 else None
    if not isinstance(raw, (list, tuple)):
        return None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
        return None
    big = np.iinfo(np.int64).max
    return np.asarray([min(max(int(v), -big), big) for v in raw], dtype=np.int64)


def _read_binary(path: str, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    n_label_bytes = 1 if layout.dataset == "cifar10" else 2
    record = n_label_bytes + IMAGE_BYTES
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise _bad(path, layout, f"cannot read ({e.strerror or e})") from None
    if raw.size == 0 or raw.size % record:
        raise _bad(
            path,
            layout,
            f"size {raw.size} bytes is not a positive multiple of the {record}-byte record "
            "(truncated or corrupt)",
        )
    rec = raw.reshape(-1, record)
    labels = rec[:, n_label_bytes - 1].astype(np.int64)  # cifar100: fine label is 2nd byte
    _check_labels(path, layout, labels)
    return _planes_to_nhwc(rec[:, n_label_bytes:]), labels.astype(np.int32)


def _check_labels(path: str, layout: _Layout, labels: np.ndarray) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise _bad(
            path,
            layout,
            f"labels outside [0, {layout.num_classes}) (min {labels.min()}, "
            f"max {labels.max()}; corrupt file?)",
        )


def _class_names(folder: str, layout: _Layout) -> tuple[str, ...]:
    """Class names from the meta file when present and sane; else indices."""
    fallback = tuple(str(i) for i in range(layout.num_classes))
    if layout.kind == "python":
        meta = os.path.join(folder, "batches.meta" if layout.dataset == "cifar10" else "meta")
        key = b"label_names" if layout.dataset == "cifar10" else b"fine_label_names"
        if not os.path.exists(meta):
            return fallback
        obj = safe_load(meta)
        if not isinstance(obj, dict):
            raise _bad(meta, layout, "meta file is not a pickled dict")
        obj = {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}
        names = obj.get(key)
    else:
        meta = os.path.join(
            folder, "batches.meta.txt" if layout.dataset == "cifar10" else "fine_label_names.txt"
        )
        if not os.path.exists(meta):
            return fallback
        with open(meta, "rb") as f:
            names = [line for line in f.read().split(b"\n") if line.strip()]
    if not isinstance(names, list) or len(names) != layout.num_classes:
        return fallback
    return tuple(
        n.decode(errors="replace").strip() if isinstance(n, bytes) else str(n) for n in names
    )


def load_cifar_tfds(name: str) -> Dataset:
    """CIFAR via tensorflow-datasets (downloads on first use)."""
    hint = (
        f"download the official python version (e.g. cifar-10-python.tar.gz), unpack it and "
        f"pass --config.data.dir=/path/to/{_LAYOUTS[name][0].folder} "
        f"(expected {expected_layouts(name)})"
    )
    try:
        import tensorflow_datasets as tfds
    except Exception as e:  # ImportError, or a broken install
        raise DataError(
            f"data.dir is empty and tensorflow-datasets is not usable ({type(e).__name__}: "
            f"{_first_line(e)}); {hint}"
        ) from None
    try:
        builder = tfds.builder(name, file_format="array_record")
        builder.download_and_prepare()
        splits = {}
        for split in ("train", "test"):
            src = builder.as_data_source(split=split)
            examples = src.__getitems__(list(range(len(src))))
            images = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])
            key = "label"
            labels = np.asarray([int(ex[key]) for ex in examples], np.int32)
            splits[split] = (images, labels)
        names = tuple(builder.info.features["label"].names)
    except Exception as e:
        raise DataError(
            f"data.dir is empty and tensorflow-datasets could not provide '{name}' "
            f"({type(e).__name__}: {_first_line(e)}); {hint}"
        ) from None
    return Dataset(
        name=name,
        train_images=splits["train"][0],
        train_labels=splits["train"][1],
        test_images=splits["test"][0],
        test_labels=splits["test"][1],
        num_classes=_LAYOUTS[name][0].num_classes,
        pixel_scale=1.0 / 255.0,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        source=f"tensorflow-datasets:{name}",
        class_names=names,
    )


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else ""
