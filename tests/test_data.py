"""Data pipeline: digits, CIFAR layouts (python + binary), safe unpickling, augmentation."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anode_jax.data import (
    DataError,
    TrainOrder,
    UnsafePickleError,
    eval_batches,
    load_dataset,
    pad_batch,
    preprocess,
    random_crop_flip,
    resolve_layout,
    safe_loads,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"
needs_shared_cifar10 = pytest.mark.skipif(
    not (SHARED_CIFAR10 / "cifar-10-batches-py" / "test_batch").exists(),
    reason=f"shared CIFAR-10 subset not found at {SHARED_CIFAR10}/cifar-10-batches-py "
    "(see /work/shared/data/README.md)",
)


# ------------------------------------------------------------------ helpers: write layouts


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _planes(images):  # NHWC -> official (N, 3072) R-plane, G-plane, B-plane rows
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _write_pickle(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10_python(root, train_batches, test, *, protocol=2):
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, (x, y) in enumerate(train_batches, 1):
        _write_pickle(
            d / f"data_batch_{i}",
            {b"batch_label": b"training batch", b"labels": list(map(int, y)), b"data": _planes(x)},
            protocol,
        )
    _write_pickle(
        d / "test_batch", {b"labels": list(map(int, test[1])), b"data": _planes(test[0])}, protocol
    )
    _write_pickle(d / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return d


def write_cifar100_python(root, train, test):
    d = Path(root) / "cifar-100-python"
    d.mkdir(parents=True)
    for name, (x, y) in (("train", train), ("test", test)):
        _write_pickle(
            d / name,
            {
                b"filenames": [b"x.png"] * len(y),
                b"fine_labels": list(map(int, y)),
                b"coarse_labels": [int(v) // 5 for v in y],
                b"data": _planes(x),
            },
        )
    _write_pickle(
        d / "meta",
        {
            b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"k{i}".encode() for i in range(20)],
        },
    )
    return d


def _records(x, labels_cols):
    return np.concatenate([np.stack(labels_cols, 1).astype(np.uint8), _planes(x)], axis=1)


def write_cifar10_binary(root, train_batches, test):
    d = Path(root) / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for i, (x, y) in enumerate(train_batches, 1):
        _records(x, [y]).tofile(d / f"data_batch_{i}.bin")
    _records(test[0], [test[1]]).tofile(d / "test_batch.bin")
    (d / "batches.meta.txt").write_text("\n".join(f"b{i}" for i in range(10)) + "\n")
    return d


def write_cifar100_binary(root, train, test):
    d = Path(root) / "cifar-100-binary"
    d.mkdir(parents=True)
    for name, (x, y) in (("train.bin", train), ("test.bin", test)):
        _records(x, [y // 5, y]).tofile(d / name)
    return d


@pytest.fixture
def small10():
    rng = np.random.default_rng(0)
    train = [(_images(20, 1), rng.integers(0, 10, 20)), (_images(12, 2), rng.integers(0, 10, 12))]
    test = (_images(8, 3), rng.integers(0, 10, 8))
    return train, test


# ------------------------------------------------------------------ digits


def test_digits_fixed_stratified_split():
    ds = load_dataset("digits")
    assert ds.train_images.shape == (1437, 8, 8, 1) and ds.test_images.shape == (360, 8, 8, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_images.max() <= 16
    counts = np.bincount(ds.test_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 360 / 10 per class +- 1
    again = load_dataset("digits")
    np.testing.assert_array_equal(ds.test_labels, again.test_labels)
    # no example is in both splits
    tr = {x.tobytes() + bytes([y]) for x, y in zip(ds.train_images, ds.train_labels)}
    te = [x.tobytes() + bytes([y]) for x, y in zip(ds.test_images, ds.test_labels)]
    assert sum(t in tr for t in te) <= 2  # the digits set has a couple of exact duplicates
    x = np.asarray(
        preprocess(ds.train_images, key=None, pixel_scale=ds.pixel_scale, mean=ds.mean, std=ds.std)
    )
    assert abs(x.mean()) < 1e-3 and abs(x.std() - 1) < 1e-3


def test_subset_and_unknown_dataset():
    ds = load_dataset("digits", train_size=100, test_size=50)
    full = load_dataset("digits")
    assert ds.num_train == 100 and ds.num_test == 50
    np.testing.assert_array_equal(ds.train_images, full.train_images[:100])
    with pytest.raises(DataError, match="only 1437 train"):
        load_dataset("digits", train_size=5000)
    with pytest.raises(DataError, match="unknown dataset 'mnist'.*digits, cifar10, cifar100"):
        load_dataset("mnist")


# ------------------------------------------------------------------ CIFAR local layouts


@needs_shared_cifar10
def test_shared_cifar10_subset():
    for d in (SHARED_CIFAR10, SHARED_CIFAR10 / "cifar-10-batches-py"):  # holder or folder
        ds = load_dataset("cifar10", str(d), train_size=2000, test_size=1000)
        assert ds.train_images.shape == (2000, 32, 32, 3) and ds.test_images.dtype == np.uint8
    assert ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
    full = load_dataset("cifar10", str(SHARED_CIFAR10))
    assert full.num_train == 10000 and full.num_test == 10000
    # README says 1,000 per class; the shuffled subset is roughly (not exactly) balanced.
    counts = np.bincount(full.train_labels, minlength=10)
    assert counts.sum() == 10000 and counts.min() > 900 and counts.max() < 1100
    # channel means of natural images in the official normalization's ballpark
    mean = full.train_images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, (0.4914, 0.4822, 0.4465), atol=0.02)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_python_layout_roundtrip(tmp_path, small10, protocol):
    train, test = small10
    write_cifar10_python(tmp_path, train, test, protocol=protocol)
    ds = load_dataset("cifar10", str(tmp_path))
    np.testing.assert_array_equal(ds.train_images, np.concatenate([x for x, _ in train]))
    np.testing.assert_array_equal(ds.train_labels, np.concatenate([y for _, y in train]))
    np.testing.assert_array_equal(ds.test_images, test[0])
    assert ds.class_names == tuple(f"c{i}" for i in range(10))
    assert "python version" in ds.source


def test_cifar10_binary_layout_matches_python(tmp_path, small10):
    train, test = small10
    write_cifar10_binary(tmp_path / "b", train, test)
    write_cifar10_python(tmp_path / "p", train, test)
    b = load_dataset("cifar10", str(tmp_path / "b" / "cifar-10-batches-bin"))
    p = load_dataset("cifar10", str(tmp_path / "p"))
    assert "binary version" in b.source
    for f in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(b, f), getattr(p, f))
    assert b.class_names == tuple(f"b{i}" for i in range(10))


def test_cifar100_python_and_binary(tmp_path):
    rng = np.random.default_rng(5)
    train = (_images(30, 7), rng.integers(0, 100, 30))
    test = (_images(10, 8), rng.integers(0, 100, 10))
    write_cifar100_python(tmp_path / "p", train, test)
    write_cifar100_binary(tmp_path / "b", train, test)
    for root in (tmp_path / "p", tmp_path / "b"):
        ds = load_dataset("cifar100", str(root))
        assert ds.num_classes == 100
        np.testing.assert_array_equal(ds.train_images, train[0])
        np.testing.assert_array_equal(ds.train_labels, train[1])  # fine labels
        np.testing.assert_array_equal(ds.test_labels, test[1])
    assert load_dataset("cifar100", str(tmp_path / "p")).class_names[3] == "f3"


# The ANODE paper's CIFAR recipe, from its reference code (github.com/amirgholami/anode,
# train.py: `transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))`, RGB
# order, on pixels scaled to [0, 1]); configs/cifar10.py and configs/cifar100.py document it.
# Written out here, not imported: a changed or swapped constant must fail.
ANODE_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
ANODE_CIFAR_STD = (0.2023, 0.1994, 0.2010)


def test_cifar_normalization_is_the_anode_recipe(tmp_path, small10):
    train, test = small10
    write_cifar10_python(tmp_path / "10", train, test)
    write_cifar100_python(tmp_path / "100", (train[0][0], train[0][1]), test)
    for name in ("cifar10", "cifar100"):
        ds = load_dataset(name, str(tmp_path / name.removeprefix("cifar")))
        assert (ds.pixel_scale, ds.mean, ds.std) == (1 / 255, ANODE_CIFAR_MEAN, ANODE_CIFAR_STD)
        x = ds.test_images[:3]
        out = preprocess(x, key=None, pixel_scale=ds.pixel_scale, mean=ds.mean, std=ds.std)
        expected = (x / 255.0 - np.array(ANODE_CIFAR_MEAN)) / np.array(ANODE_CIFAR_STD)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_missing_files_name_file_and_layout(tmp_path, small10):
    train, test = small10
    d = write_cifar10_python(tmp_path, train, test)
    (d / "test_batch").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tmp_path))
    msg = str(e.value)
    assert str(d / "test_batch") in msg and "cifar-10-batches-py" in msg and "\n" not in msg
    with pytest.raises(DataError, match="not a directory.*cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no cifar100 data.*cifar-100-python/"):
        load_dataset("cifar100", str(empty))


def test_truncated_and_corrupt_files(tmp_path, small10):
    train, test = small10
    d = write_cifar10_python(tmp_path / "p", train, test)
    raw = (d / "data_batch_1").read_bytes()
    (d / "data_batch_1").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"data_batch_1: not a readable pickle \(truncated"):
        load_dataset("cifar10", str(d))
    (d / "data_batch_1").write_bytes(b"garbage that is no pickle")
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset("cifar10", str(d))
    _write_pickle(d / "data_batch_1", {b"data": np.zeros((3, 100), np.uint8), b"labels": [0] * 3})
    with pytest.raises(
        DataError, match=r"data_batch_1: b'data' is a uint8 array of shape \(3, 100\)"
    ):
        load_dataset("cifar10", str(d))
    _write_pickle(
        d / "data_batch_1", {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 12]}
    )
    with pytest.raises(DataError, match=r"data_batch_1: labels outside \[0, 10\)"):
        load_dataset("cifar10", str(d))

    b = write_cifar10_binary(tmp_path / "b", train, test)
    raw = (b / "test_batch.bin").read_bytes()
    (b / "test_batch.bin").write_bytes(raw[:-100])
    with pytest.raises(
        DataError,
        match=r"test_batch.bin: size \d+ bytes is not a positive multiple "
        r"of the 3073-byte record",
    ):
        load_dataset("cifar10", str(b))


# ------------------------------------------------------------------ restricted unpickler


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, small10):
    target = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Evil(target), b"labels": [0]}, protocol=2)
    with pytest.raises(
        UnsafePickleError, match=r"refusing to unpickle global '(posix|os|nt)\.system'"
    ):
        safe_loads(payload)
    assert not target.exists()
    # Same payload disguised as a CIFAR batch: the loader refuses it too.
    train, test = small10
    d = write_cifar10_python(tmp_path / "c", train, test)
    (d / "data_batch_1").write_bytes(payload)
    with pytest.raises(DataError, match="data_batch_1: refusing to unpickle"):
        load_dataset("cifar10", str(d))
    assert not target.exists()
    # Sanity check that the payload is live: plain pickle would have run it.
    pickle.loads(payload)
    assert target.exists()


@pytest.mark.parametrize(
    "module,name",
    [
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("subprocess", "Popen"),
        ("numpy", "load"),
        ("builtins", "getattr"),
    ],
)
def test_unpickler_refuses_other_globals(module, name):
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"q\x00."
    with pytest.raises(UnsafePickleError, match=f"'{module}.{name}'"):
        safe_loads(payload)


def test_unpickler_admits_containers_and_arrays():
    obj = {
        b"a": [1, 2.5, None, True, (b"x", "y")],
        "s": {3},
        b"arr": np.arange(6).reshape(2, 3),
        b"f": np.float32(1.5),
        b"u8": np.zeros((2, 2), np.uint8),
    }
    for protocol in (2, 4, 5):
        out = safe_loads(pickle.dumps(obj, protocol=protocol))
        np.testing.assert_array_equal(out[b"arr"], obj[b"arr"])
        assert out[b"a"] == obj[b"a"] and out["s"] == {3} and out[b"f"] == np.float32(1.5)


# ------------------------------------------------------------------ tfds fallback (no network)


def test_tfds_unavailable_suggests_data_dir(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails, no network
    with pytest.raises(
        DataError, match=r"data.dir is empty.*--config.data.dir=.*cifar-10-batches-py"
    ):
        load_dataset("cifar10", "")


def test_resolve_layout_prefers_named_folder(tmp_path, small10):
    train, test = small10
    d = write_cifar10_binary(tmp_path, train, test)
    layout, folder = resolve_layout("cifar10", str(tmp_path))
    assert layout.kind == "binary" and folder == str(d)


# ------------------------------------------------------------------ order and augmentation


def test_train_order_is_a_resumable_permutation():
    order = TrainOrder(103, 10, seed=3)
    assert order.steps_per_epoch == 10
    epoch0 = np.concatenate([order.indices(s) for s in range(10)])
    assert len(set(epoch0.tolist())) == 100  # no repeats within an epoch
    epoch1 = np.concatenate([order.indices(s) for s in range(10, 20)])
    assert not np.array_equal(epoch0, epoch1)
    fresh = TrainOrder(103, 10, seed=3)  # e.g. after a restart
    np.testing.assert_array_equal(fresh.indices(17), order.indices(17))
    assert fresh.position(17) == (1, 7)
    assert not np.array_equal(TrainOrder(103, 10, seed=4).indices(0), order.indices(0))


def test_eval_batches_and_padding():
    spans = list(eval_batches(10, 4))
    assert spans == [(0, 4), (4, 8), (8, 10)]
    x, y, m = pad_batch(np.ones((2, 3, 3, 1), np.uint8), np.array([1, 2], np.int32), 4)
    assert x.shape == (4, 3, 3, 1) and y.tolist() == [1, 2, 0, 0] and m.tolist() == [1, 1, 0, 0]


def test_random_crop_flip_is_a_shifted_window_and_deterministic():
    rng = np.random.default_rng(0)
    imgs = jnp.asarray(rng.random((64, 8, 8, 3), dtype=np.float32))
    key = jax.random.fold_in(jax.random.key(0), 7)
    f = jax.jit(lambda k, x: random_crop_flip(k, x, pad=2, flip=True))
    out = np.asarray(f(key, imgs))
    np.testing.assert_array_equal(out, np.asarray(f(key, imgs)))
    assert not np.array_equal(out, np.asarray(f(jax.random.fold_in(jax.random.key(0), 8), imgs)))
    padded = np.pad(np.asarray(imgs), ((0, 0), (2, 2), (2, 2), (0, 0)))
    flips = 0
    for i in range(64):
        windows = [padded[i, a : a + 8, b : b + 8] for a in range(5) for b in range(5)]
        plain = any(np.array_equal(out[i], w) for w in windows)
        flipped = any(np.array_equal(out[i], w[:, ::-1]) for w in windows)
        assert plain or flipped, i
        flips += flipped and not plain
    assert 16 <= flips <= 48  # Bernoulli(0.5) over 64 images


def test_preprocess_zero_padding_is_black_before_normalization():
    x = jnp.full((4, 4, 4, 3), 255, jnp.uint8)
    out = preprocess(x, key=None, pixel_scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.25,) * 3)
    np.testing.assert_allclose(np.asarray(out), 2.0, rtol=1e-6)
    aug = np.asarray(
        preprocess(
            x,
            key=jax.random.key(1),
            pixel_scale=1 / 255,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            crop_pad=2,
            flip=True,
        )
    )
    assert set(np.unique(aug).round(5)) <= {-2.0, 2.0} and (aug == -2.0).any()
