"""Schedules equal explicit sequences, boundary steps included, and serialise to plain dicts."""

from __future__ import annotations

import math
import pickle

import pytest

import bilevel_ray as br
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
        schedules.piecewise_constant((10, 15), (1.0, 3.0, 2.0)),
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


def test_piecewise_constant_holds_each_value_on_its_segment():
    s = schedules.piecewise_constant(boundaries=[3, 5], values=[10, 30.0, 20.0])
    assert [s(t) for t in range(7)] == [10.0, 10.0, 10.0, 30.0, 30.0, 20.0, 20.0]
    assert s.minimum() == (10.0, True)
    assert schedules.to_dict(s) == {
        "kind": "piecewise_constant",
        "boundaries": [3, 5],
        "values": [10.0, 30.0, 20.0],
    }


@pytest.mark.parametrize(
    "boundaries, values, match",
    [
        ((5, 3), (1.0, 2.0, 3.0), "must increase strictly"),
        ((5,), (1.0,), "1 boundaries need 2 values"),
        ((0,), (1.0, 2.0), r"integer step > 0"),
        ((2.5,), (1.0, 2.0), r"integer step > 0"),
        ("5", (1.0, 2.0), "both must be lists"),
        ((5,), (1.0, math.nan), r"values\[1\]=nan: must be a finite number"),
        ((5,), (1.0, 10**400), r"values\[1\]=<an integer of 401 digits>: beyond a float's range"),
    ],
)
def test_piecewise_constant_refuses_bad_segments(boundaries, values, match):
    with pytest.raises(br.ConfigError, match=match):
        schedules.piecewise_constant(boundaries, values)


def test_a_gamma_that_cannot_stay_positive_is_refused_before_the_run():
    with pytest.raises(br.ConfigError, match=r"gamma=.*must stay > 0 at every step"):
        schedules.positive_schedule("gamma", schedules.piecewise_constant((5,), (1.0, -1.0)))


def test_values_beyond_a_float_are_config_errors_not_overflows():
    with pytest.raises(br.ConfigError, match="end_value=<an integer of 401 digits>: beyond"):
        schedules.linear(1, 10**400, 10)
    with pytest.raises(br.ConfigError, match="its values leave a float's range"):
        schedules.positive_schedule("gamma", schedules.inverse_power(1e300, -40.0, 1e10))
    with pytest.raises(br.ConfigError, match="gamma cannot be computed at step 1000000"):
        schedules.checked_value("gamma", schedules.inverse_power(1.0, -200.0), 10**6)
