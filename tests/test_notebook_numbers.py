"""The stored notebook outputs hold the key numbers a fresh run is compared with.

The comparison itself (`tests/_notebook_numbers.assert_same_key_numbers`) runs in the slow
`tests/test_notebooks.py` execution test, on the outputs of the same fresh run; here: the
stored notebooks carry those numbers, and the comparison rejects what it should.
"""

import copy
import json
from pathlib import Path

import pytest

from tests._notebook_numbers import assert_same_key_numbers, key_numbers

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name", ["backsolve_vs_anode", "anodev2_kernels"])
def test_stored_training_notebooks_carry_key_numbers(name):
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    numbers = key_numbers(nb)
    kinds = [k for _, k, _, _ in numbers]
    assert kinds.count("params") >= 2 and kinds.count("epoch") >= 8, numbers
    assert_same_key_numbers(nb, nb)


def test_comparison_rejects_changed_numbers():
    nb = json.loads((NOTEBOOKS / "backsolve_vs_anode.ipynb").read_text())
    for old, new in [("112,106 parameters", "112,107 parameters"), ("accuracy 0.", "accuracy 1.")]:
        changed = copy.deepcopy(nb)
        for cell in changed["cells"]:
            for o in cell.get("outputs", []):
                if "text" in o:
                    text = "".join(o["text"])
                    o["text"] = text.replace(old, new, 1)
        with pytest.raises(AssertionError):
            assert_same_key_numbers(nb, changed)
