"""configs/*.py are thin wrappers over the package's get_config (notebooks need no checkout)."""

import importlib.util
import pathlib

import pytest

from anode_jax.training import CONFIG_NAMES, ConfigError, get_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_file_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


@pytest.mark.parametrize(
    "name,arg",
    [
        ("default", None),
        ("cifar10", None),
        ("cifar10", "resnet4-anode"),
        ("cifar100", "sqnxt-anodev2"),
    ],
)
def test_file_configs_equal_package_configs(name, arg):
    assert load_file_config(name, arg).to_dict() == get_config(name, arg).to_dict()
    spelled = f"{name}:{arg}" if arg else name
    assert get_config(spelled).to_dict() == get_config(name, arg).to_dict()


def test_every_config_name_has_a_file_and_back():
    assert sorted(p.stem for p in (REPO / "configs").glob("*.py")) == sorted(CONFIG_NAMES)


def test_cifar_configs_differ_only_in_the_dataset():
    a, b = get_config("cifar10", "resnet4-anode"), get_config("cifar100", "resnet4-anode")
    assert a.data.name == "cifar10" and b.data.name == "cifar100"
    b.data.name = "cifar10"
    assert a.to_dict() == b.to_dict()


@pytest.mark.parametrize(
    "name,arg,pattern",
    [
        ("mnist", None, "unknown config 'mnist'"),
        ("cifar10", "resnet4-nope", "MODEL-METHOD"),
        ("default", "x", "takes no argument"),
    ],
)
def test_bad_names_are_clear(name, arg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        get_config(name, arg)
