"""The key deterministic numbers of a notebook's outputs, to compare stored with fresh runs.

Parameter counts must match exactly; per-epoch test accuracy and loss of the training runs
(seeded, full-batch evaluation on the 360 test digits) within the spread a different CPU's
float rounding gives (an image or two, a few percent of loss). Times, paths and float32
round-off figures are not compared.
"""

import re

PARAMS = re.compile(r"model (?P<key>.+?): (?P<value>[\d,]+) parameters")
EPOCH = re.compile(
    r"(?P<key>epoch \d+/\d+ step \d+): test accuracy (?P<accuracy>[\d.]+) loss (?P<loss>[\d.]+)"
)
ACCURACY_ATOL = 2 / 360
LOSS_RTOL = 0.05


def _text(output) -> str:
    return "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))


def key_numbers(notebook) -> list[tuple]:
    """[(cell index, kind, key, values)] in output order."""
    found = []
    for i, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        text = "".join(_text(o) for o in cell.get("outputs", []))
        for m in PARAMS.finditer(text):
            found.append((i, "params", m["key"], int(m["value"].replace(",", ""))))
        for m in EPOCH.finditer(text):
            found.append((i, "epoch", m["key"], (float(m["accuracy"]), float(m["loss"]))))
    return found


def assert_same_key_numbers(stored, fresh) -> None:
    a, b = key_numbers(stored), key_numbers(fresh)
    assert [x[:3] for x in a] == [x[:3] for x in b], "different runs or lines in the outputs"
    for (cell, kind, key, old), (_, _, _, new) in zip(a, b):
        where = f"cell {cell}, {key}: stored {old}, fresh {new}; rerun scripts/run_notebooks.py"
        if kind == "params":
            assert old == new, where
        else:
            assert abs(old[0] - new[0]) <= ACCURACY_ATOL, where
            assert abs(old[1] - new[1]) <= LOSS_RTOL * abs(old[1]), where
