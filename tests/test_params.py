"""Parameter constraints as data (core.params): what each constraint accepts, how it is described, and
the declared fields that FitConfig, the CLI and the Refine form are built from."""
from dataclasses import dataclass

import numpy as np
import pytest

from core.errors import ConfigError
from core.params import (
    Interval,
    Options,
    Param,
    TupleOf,
    accepts,
    check_param,
    check_params,
    describe,
    interval_of,
    options_of,
    param,
    params_of,
    parse,
)


@pytest.mark.parametrize("closed, low_ok, high_ok", [
    ("both", True, True), ("left", True, False), ("right", False, True), ("neither", False, False),
])
def test_an_interval_takes_its_ends_as_closed_says(closed, low_ok, high_ok):
    interval = Interval(float, 0.0, 0.5, closed)
    assert interval.accepts(0.0) is low_ok and interval.accepts(0.5) is high_ok
    assert interval.accepts(0.25) and not interval.accepts(-0.01) and not interval.accepts(0.51)


def test_an_unbounded_end_takes_any_number_on_that_side():
    assert Interval(int, 1, None).accepts(10**12) and not Interval(int, 1, None).accepts(0)
    assert Interval(float, None, 0.0, "neither").accepts(-1e300) and not Interval(float, None, 0.0, "neither").accepts(0.0)


@pytest.mark.parametrize("constraint", [Interval(int, None, None), Interval(float, None, None), int, float])
def test_bool_is_never_a_number(constraint):
    assert not accepts(constraint, True) and not accepts(constraint, False)


def test_an_int_interval_takes_only_integers_and_a_float_one_takes_both():
    assert Interval(int, 0, 10).accepts(np.int64(3)) and not Interval(int, 0, 10).accepts(3.0)
    assert Interval(float, 0, 10).accepts(3) and Interval(float, 0, 10).accepts(np.float32(2.5))
    assert not Interval(float, None, None).accepts(float("nan"))
    assert not Interval(float, 0, 10).accepts("3")


def test_options_are_type_strict():
    options = Options("auto", 1)
    assert options.accepts("auto") and options.accepts(1)
    assert not options.accepts(True)  # True == 1, but it is not the option 1
    assert not options.accepts(1.0) and not options.accepts("AUTO")


def test_a_tuple_of_checks_every_item_and_its_length():
    layers = TupleOf(Options("a", "b"), min_len=1)
    assert layers.accepts(("a",)) and layers.accepts(("b", "a"))
    assert not layers.accepts(()) and not layers.accepts(("a", "c")) and not layers.accepts(["a"])
    assert TupleOf(str).accepts(()) and not TupleOf(str).accepts(("x", 1))


def test_types_and_none_are_constraints():
    assert accepts(str, "x") and not accepts(str, None)
    assert accepts(None, None) and not accepts(None, 0)
    assert accepts(bool, False) and not accepts(bool, 0)


@pytest.mark.parametrize("constraints, words", [
    ([Interval(int, 1, None)], "an int >= 1"),
    ([Interval(float, 0.0, 0.5, "right"), Options("auto")], "a number in (0, 0.5] or 'auto'"),
    ([Interval(float, None, 10.0, "neither"), None], "a number < 10 or None"),
    ([Options("gde", "knn")], "one of 'gde', 'knn'"),
    ([bool], "True or False"),
    ([TupleOf(Options("a", "b"), min_len=1)], "a non-empty tuple, each one of 'a', 'b'"),
])
def test_describe_says_the_allowed_values_in_words(constraints, words):
    assert describe(constraints) == words


def test_a_refusal_names_the_owner_the_parameter_the_allowed_values_and_the_value():
    with pytest.raises(ConfigError) as refused:
        check_param("knn", "n_neighbors", 0, [Interval(int, 1, None)])
    assert str(refused.value) == "knn: n_neighbors must be an int >= 1; got 0"

    class Refused(ValueError):
        pass

    with pytest.raises(Refused, match=r"^shrinkage must be 'oas' or a number in \[0, 1\]; got 'lw'$"):
        check_params("", {"shrinkage": "lw", "other": object()},
                     {"shrinkage": [Options("oas"), Interval(float, 0, 1)]}, error=Refused)
    check_params("x", {"n": 3}, {"n": [Interval(int, 1, None)], "absent": [int]})  # only given names are checked


def test_options_and_interval_are_read_back_for_the_cli_and_the_form():
    constraints = [Interval(float, 0.0, 0.5, "right"), Options("auto"), Options("off")]
    assert options_of(constraints) == ("auto", "off")
    assert interval_of(constraints) == Interval(float, 0.0, 0.5, "right")
    assert interval_of([Options("x")]) is None


def test_parse_reads_a_keyword_or_a_number_but_leaves_the_range_to_the_check():
    gamma = [Interval(float, 0.0, 0.5, "right"), Options("auto")]
    assert parse("gamma", " AUTO ", gamma) == "auto"
    assert parse("gamma", "0.7", gamma) == 0.7
    assert parse("k", "3", [Interval(int, 1, None)]) == 3
    assert parse("name", "x", [str, None]) == "x"
    with pytest.raises(ConfigError, match=r"gamma must be a number in \(0, 0.5\] or 'auto'; got 'lots'"):
        parse("gamma", "lots", gamma)


def test_a_declared_field_keeps_its_param_and_refuses_form_hints_outside_its_constraints():
    @dataclass(frozen=True)
    class Knobs:
        k: int = param(5, [Interval(int, 1, None)], "How many.", label="K", form_min=2, form_max=20)
        size: int = param(64, [Interval(int, 32, 1024)], "Pixels.", form_values=(32, 64))
        plain: int = 0

    specs = params_of(Knobs)
    assert list(specs) == ["k", "size"]
    assert specs["k"].label == "K" and specs["k"].help == "How many." and specs["k"].form_range() == (2, 20)
    assert specs["size"].form_range() == (32, 1024)
    assert Param((Interval(int, 0, 10, "neither"),), "open ends").form_range() == (1, 9)
    with pytest.raises(ValueError, match="form bound"):
        Param((Interval(int, 1, None),), "K.", form_min=0)
    with pytest.raises(ValueError, match="form value"):
        Param((Interval(int, 32, 1024),), "px", form_values=(16, 32))
    with pytest.raises(ValueError, match="default"):
        param(0, [Interval(int, 1, None)], "K.")
