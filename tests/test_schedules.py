"""Schedules equal explicit sequences, boundary steps included, and serialise to plain dicts."""

from __future__ import annotations

import pickle

import pytest

from bilevel_ray import schedules


def test_constant():
    assert [schedules.constant(3.0)(t) for t in (0, 1, 10**6)] == [3.0, 3.0, 3.0]


def test_linear_with_delay():
    s = schedules.linear(2.0, 10.0, transition_steps=4, transition_begin=2)
    assert [s(t) for t in range(8)] == [2.0, 2.0, 2.0, 4.0, 6.0, 8.0, 10.0, 10.0]


def test_linear_with_zero_transition_is_a_step_function():
    s = schedules.linear(1.0, 5.0, transition_steps=0, transition_begin=3)
    assert [s(t) for t in range(5)] == [1.0, 1.0, 1.0, 5.0, 5.0]


def test_pbgd_ramp_reaches_gamma_max_at_its_argmax_step():
    ramp = schedules.pbgd_ramp(gamma_init=0.0, gamma_max=10.0, gamma_argmax_step=5)
    assert [ramp(t) for t in (0, 1, 5, 6, 1000)] == [0.0, 2.0, 10.0, 10.0, 10.0]


def test_inverse_power():
    s = schedules.inverse_power(scale=1.0, exponent=0.5)
    assert [s(t) for t in (0, 3, 15)] == [1.0, 0.5, 0.25]
    grow = schedules.inverse_power(scale=2.0, exponent=-1.0)
    assert [grow(t) for t in (0, 1, 2)] == [2.0, 4.0, 6.0]


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.constant(2.0),
        schedules.linear(1.0, 3.0, 10, 2),
        schedules.pbgd_ramp(1.0, 10.0, 100),
        schedules.inverse_power(0.1, 0.5, 2.0),
    ],
)
def test_round_trips_through_dict_and_pickle(schedule):
    rebuilt = schedules.from_dict(schedules.to_dict(schedule))
    assert rebuilt == schedule
    assert pickle.loads(pickle.dumps(schedule)) == schedule
    assert [rebuilt(t) for t in range(20)] == [schedule(t) for t in range(20)]


def test_positive_schedule_accepts_a_decaying_step_size_and_numbers():
    assert schedules.positive_schedule("lr", schedules.inverse_power(0.1, 1.0))(10**9) > 0
    assert schedules.positive_schedule("lr", 0.5)(7) == 0.5
