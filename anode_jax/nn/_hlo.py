"""Inspect compiled XLA programs: convolutions left outside XLA:CPU's fast layout in loops.

XLA:CPU runs a convolution through its fast (Eigen) kernel only when the convolution is in
the canonical layout: input `b01f` (NHWC), kernel `01io` (HWIO), output `b01f`, no
window reversal, float32/float16. Its canonicalization pass rewrites other layouts into this
one only in the program's entry computation; a convolution inside a while body (`lax.scan`,
`fori_loop`, a looped checkpoint) keeps the layout it was written in and, if that is not the
canonical one, falls back to a naive loop nest (10–100× slower; jax issue #12868).
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLED = re.compile(
    r"\b(?:calls|to_apply|body|condition|branch_computations|true_computation|"
    r"false_computation)=(\{[^}]*\}|%?[\w.\-]+)"
)
_NAME = re.compile(r"%?([\w.\-]+)")
_DIM_LABELS = re.compile(r"dim_labels=([\w]+)_([\w]+)->([\w]+)")


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines}."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            match = _HEADER.match(line)
            if match and not line.startswith((" ", "\t")):
                current = match.group(2)
                computations[current] = []
        elif line.startswith("}"):
            current = None
        else:
            computations[current].append(line)
    return computations


def _called(line: str) -> list[str]:
    names = []
    for match in _CALLED.finditer(line):
        names += _NAME.findall(match.group(1))
    return names


def is_canonical_conv(line: str) -> bool:
    """Whether one HLO `convolution` instruction is in XLA:CPU's fast layout.

    Canonical: `dim_labels=b01f_01io->b01f` (`b0f_0io->b0f` in 1-D, `b012f_012io->b012f`
    in 3-D) and no `rhs_reversal` in its window. The element type is not checked.
    """
    match = _DIM_LABELS.search(line)
    if match is None or "rhs_reversal" in line:
        return False
    lhs, rhs, out = match.groups()
    spatial = lhs[1:-1]
    return (
        spatial == "".join(str(i) for i in range(len(spatial)))
        and lhs == f"b{spatial}f"
        and rhs == f"{spatial}io"
        and out == f"b{spatial}f"
    )


def convs_in_loops(compiled_text: str) -> list[str]:
    """Every `convolution(` instruction (stripped line) inside a while loop of a program.

    "Inside" means in a computation reachable from a while instruction's body or condition
    (through calls, fusions, nested loops, conditionals). `compiled_text`:
    `jax.jit(f).lower(*args).compile().as_text()`.
    """
    return _convs(compiled_text, include_entry=False)


def _convs(compiled_text: str, *, include_entry: bool) -> list[str]:
    computations = _computations(compiled_text)
    calls = {
        name: [c for line in lines for c in _called(line)] for name, lines in computations.items()
    }
    in_loop: set[str] = set()
    stack = []
    for lines in computations.values():
        for line in lines:
            if " while(" in line:
                stack += _called(line)
    while stack:
        name = stack.pop()
        if name in in_loop or name not in computations:
            continue
        in_loop.add(name)
        stack += calls[name]
    checked = set(computations) if include_entry else in_loop
    return [
        line.strip()
        for name, lines in computations.items()
        if name in checked
        for line in lines
        if " convolution(" in line
    ]


def noncanonical_convs(compiled_text: str, *, include_entry: bool = False) -> list[str]:
    """The convolutions of a compiled program that XLA:CPU will run on its slow path.

    Args:
      compiled_text: `jax.jit(f).lower(*args).compile().as_text()` (optimized HLO).
      include_entry: also report non-canonical convolutions outside loops (by default only
        convolutions in computations reachable from a while loop's body or condition are
        checked: in the entry computation XLA:CPU canonicalizes them itself).

    Returns:
      The offending `convolution(` instruction lines (stripped), empty when every
      convolution checked has `dim_labels=b01f_01io->b01f` (any spatial rank) and no
      window reversal. A program without loops returns `[]` unless `include_entry`.
    """
    return [
        line
        for line in _convs(compiled_text, include_entry=include_entry)
        if not is_canonical_conv(line)
    ]
