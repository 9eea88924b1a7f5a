"""The checkpoint schedule is not only valid but optimal: Griewank's binomial minimum.

Griewank (1992), "Achieving logarithmic growth of temporal and spatial complexity in reverse
automatic differentiation", and Griewank & Walther (2000), ACM TOMS 26(1), Algorithm 799
("revolve"), Prop. 1: reversing l steps with s checkpoints (the held initial state counts as
one) needs at least

    t(l, s) = r l - C(s + r, s + 1)   forward steps besides the first forward sweep,

where r is the unique integer with C(s + r - 1, s) < l <= C(s + r, s), and the binomial
schedules attain it. (With one checkpoint: r = l - 1, t = l (l - 1) / 2; with s >= l:
r = 1, t = l - 1, every state stored once.)
"""

from math import comb

import pytest

from anode_jax.ode.adjoints.checkpointed import revolve_schedule


def griewank_minimum(num_steps: int, num_checkpoints: int) -> int:
    """Minimal recomputed forward steps to reverse `num_steps` steps holding at most
    `num_checkpoints` states, from the closed-form binomial bound (no dynamic programme)."""
    if num_steps == 1:
        return 0
    s = num_checkpoints
    r = 1
    while comb(s + r, s) < num_steps:
        r += 1
    return r * num_steps - comb(s + r, s + 1)


def schedule_cost(schedule) -> tuple[int, list[int]]:
    """(recomputed forward steps, steps backpropagated in order) of a backward schedule.

    The one place that reads actions, so a new planner's action format adapts here: an action
    (src, dst, n0, n1, vjp) loads the state y_n0 and advances it n1 - n0 steps to y_n1; with
    vjp=False it stores y_n1, with vjp=True it backpropagates through step n1 (whose internals
    are recomputed inside the VJP, not counted as a forward step: the same for every schedule).
    """
    steps, reversed_steps = 0, []
    for action in schedule:
        steps += action.n1 - action.n0
        if action.vjp:
            reversed_steps.append(action.n1)
    return steps, reversed_steps


def test_closed_form_matches_known_values():
    # Worked values: one checkpoint is the triangle number; Nt = 64, K = 4 is 200 steps.
    assert griewank_minimum(10, 1) == 45
    assert griewank_minimum(64, 4) == 200
    assert griewank_minimum(8, 8) == 7
    assert griewank_minimum(5, 2) == 6  # r = 2: 2 * 5 - C(4, 3)
    # t(l, s) with the same r is linear in l, and r grows exactly at l = C(s + r, s) + 1.
    assert griewank_minimum(35, 3) - griewank_minimum(34, 3) == 4  # C(7,3) = 35 -> r = 4
    assert griewank_minimum(36, 3) - griewank_minimum(35, 3) == 5


GRID = [
    (num_steps, k)
    for num_steps in (1, 2, 3, 5, 8, 13, 16, 31, 64, 100, 257)
    for k in (1, 2, 3, 4, 6, 10, 300)
]


@pytest.mark.parametrize("num_steps,num_checkpoints", GRID)
def test_revolve_schedule_meets_the_binomial_minimum(num_steps, num_checkpoints):
    schedule = revolve_schedule(num_steps, num_checkpoints)
    cost, reversed_steps = schedule_cost(schedule)
    assert reversed_steps == list(range(num_steps - 1, -1, -1))
    assert cost == griewank_minimum(num_steps, num_checkpoints), (
        f"Nt={num_steps}, K={num_checkpoints}: {cost} recomputed steps, the binomial minimum is "
        f"{griewank_minimum(num_steps, num_checkpoints)}"
    )
