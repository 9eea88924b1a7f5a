"""End-to-end test of the reproduction driver (benchmarks/reproduce.py) on a tiny slice.

Both parts run for real (a tiny ODE block; two CIFAR-style runs of one training step on
the shared subset, or on synthetic files in the official layout when it is absent), and
the outputs' structure is checked. Tolerances: the exact strategies (anode,
checkpointed:2) must match "direct" to round-off, ≤ 1e-5 relative in float32 and
≤ 1e-10 in float64; backsolve must be off by more than 1 % at Euler Nt ≤ 2, the regime
where the papers measure tens of percent.
"""

import importlib.util
import json
import os
import pickle
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data", "cifar10")


def _batch_statistics_accuracy(config, workdir):
    """Test accuracy of the run's checkpoint with the statistics of the (single) test batch."""
    import jax.numpy as jnp
    import ml_collections

    from anode_jax.data.augment import normalize
    from anode_jax.training import restore

    restored = restore(ml_collections.ConfigDict(config), workdir)
    ds, state = restored.dataset, restored.state
    x = normalize(ds.test_images, pixel_scale=ds.pixel_scale, mean=ds.mean, std=ds.std)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits, _ = restored.model.apply(variables, x, train=True, mutable=["batch_stats"])
    return float(jnp.mean(jnp.argmax(logits, -1) == ds.test_labels))


def _driver():
    if "_reproduce_driver" in sys.modules:
        return sys.modules["_reproduce_driver"]
    spec = importlib.util.spec_from_file_location(
        "_reproduce_driver", os.path.join(ROOT, "benchmarks", "reproduce.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _cifar_dir(tmp_path):
    """The shared subset if present, else 64 + 32 random images in the official layout."""
    if os.path.exists(os.path.join(SHARED, "cifar-10-batches-py", "data_batch_1")):
        return SHARED
    d = tmp_path / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 64), ("test_batch", 32)):
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(x) for x in rng.integers(0, 10, n)],
        }
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, f)
    return str(tmp_path / "cifar10")


@pytest.mark.slow
def test_gradient_part_tiny(tmp_path):
    R = _driver()
    payload = R.run_gradients(
        fields=("resnet",),
        solvers=("euler",),
        nts=(1, 2),
        dtypes=("float32", "float64"),
        scales=(1.0,),
        setup=R.GradSetup(batch=2, size=4, channels=4),
        out_dir=str(tmp_path),
        log=lambda msg: None,
        live_figures=False,
    )
    for name in ("gradients.json", "gradient_error.png", "reconstruction.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "gradients.json") as f:
        assert json.load(f)["complete"] is True
    recs = payload["records"]
    assert len(recs) == 4  # 2 Nt x 2 dtypes
    tol = {"float32": 1e-5, "float64": 1e-10}
    for r in recs:
        for strategy in R.EXACT_STRATEGIES:
            assert r[f"{strategy}_theta"] <= tol[r["dtype"]], r
            assert r[f"{strategy}_z0"] <= tol[r["dtype"]], r
        assert r["backsolve_theta"] > 0.01, r  # Euler, Nt <= 2: backsolve is not exact
        # The reverse solve does not reconstruct z(0) (Euler, Nt <= 2): far above round-off.
        assert r["recon_error"] > {"float32": 1e-4, "float64": 1e-8}[r["dtype"]], r
    # rerunning keeps the finished cases instead of recomputing them
    again = R.run_gradients(
        fields=("resnet",),
        solvers=("euler",),
        nts=(1, 2),
        dtypes=("float32", "float64"),
        scales=(1.0,),
        setup=R.GradSetup(batch=2, size=4, channels=4),
        out_dir=str(tmp_path),
        log=lambda msg: pytest.fail(f"recomputed a finished case: {msg}"),
    )
    assert again["records"] == recs
    md, verdict = R.gradient_section(str(tmp_path))
    assert "## 1. Gradient consistency" in md
    assert verdict["exact_roundoff"] == {"float32": True, "float64": True}


@pytest.mark.slow
def test_training_part_tiny(tmp_path):
    R = _driver()
    data = _cifar_dir(tmp_path)
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    kwargs = dict(
        models=("resnet4",),
        methods=("backsolve", "anode"),
        seeds=(0,),
        runs_dir=runs,
        results_dir=results,
        check_bn=False,
        log=lambda msg: None,
        epochs=1,
        width=0.0625,
        train_size=32,  # batch 32: one optimizer step
        test_size=16,
    )
    done = R.run_table("cpu", data, **kwargs)
    assert [d["run"] for d in done] == ["resnet4-backsolve-s0", "resnet4-anode-s0"]
    for name in ("resnet4-backsolve-s0", "resnet4-anode-s0"):
        with open(os.path.join(results, "cpu", name, "summary.json")) as f:
            summary = json.load(f)
        assert summary["steps"] == 1
        assert summary["config"]["model"]["method"] == name.split("-")[1]
        assert summary["config"]["model"]["width"] == 0.0625
        with open(os.path.join(results, "cpu", name, "metrics.jsonl")) as f:
            tests = [r for r in map(json.loads, f) if r.get("split") == "test"]
        assert summary["final_test_accuracy"] == tests[-1]["accuracy"]  # the logged evaluation
    assert R.run_table("cpu", data, **kwargs) == []  # finished runs are skipped
    bn = R.bn_check("cpu", runs_dir=runs, results_dir=results, log=lambda msg: None)
    assert sorted(bn) == ["resnet4-anode-s0", "resnet4-backsolve-s0"]
    for name, r in bn.items():
        with open(os.path.join(results, "cpu", name, "summary.json")) as f:
            summary = json.load(f)
        # running averages = the trainer's own evaluation of the same checkpoint and images
        assert r["test_accuracy_running_averages"] == pytest.approx(
            summary["final_test_accuracy"], abs=1e-6
        )
        # batch statistics: recounted here with the test batch (16 images) in train mode
        assert r["batch"] == 16 and r["step"] == 1
        recount = _batch_statistics_accuracy(summary["config"], os.path.join(runs, "cpu", name))
        assert r["test_accuracy_batch_statistics"] == pytest.approx(recount, abs=1e-6)
    doc = tmp_path / "reproduction.md"
    text = R.write_report(results_dir=results, doc_path=str(doc))
    assert "Runs finished: 2 of 32" in text
    assert "| backsolve | 1 |" in text and "| anode | 1 |" in text
    assert "backsolve − ANODE" in text
    assert os.path.exists(os.path.join(results, "cpu", "resnet4_curves.png"))


def test_cpu_config_is_the_paper_recipe_scaled():
    R = _driver()
    c = R.run_config("cpu", "sqnxt", "backsolve", 1, "/data")
    assert (c.model.solver, c.model.num_steps, c.model.adjoint) == ("midpoint", 2, "backsolve")
    assert c.optim.lr_milestones == R.scaled_milestones(R.CPU_EPOCHS)
    assert (c.optim.learning_rate, c.optim.momentum, c.optim.weight_decay) == (0.1, 0.9, 5e-4)
    p = R.run_config("paper", "resnet10", "anode", 0, "/data")
    assert (p.num_epochs, p.batch_size, tuple(p.optim.lr_milestones)) == (350, 256, (150, 250))
    assert (p.model.num_steps, p.model.width, p.data.train_size) == (2, 1.0, 0)
    assert R.scaled_milestones(350) == (150, 250)
