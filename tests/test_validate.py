"""Parameter validators: the cleaned value on success, the parameter's name in every error."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest

from medgen.errors import MedgenError
from medgen.validate import (
    ParameterError,
    check_axis,
    check_bool,
    check_finite,
    check_fraction,
    check_in_interval,
    check_int,
    check_non_negative,
    check_positive,
    check_range,
    check_same_shape,
    check_seed,
    check_volume_array,
    literal_options,
    look_up_option,
)


def test_parameter_error_is_value_error_and_medgen_error():
    with pytest.raises(ParameterError) as info:
        check_positive("sigma", -1)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, MedgenError)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_positive("sigma", -1), r"^`sigma` must be > 0, got -1.0$"),
        (lambda: check_positive("sigma", 0), r"`sigma` must be > 0, got 0.0"),
        (lambda: check_positive("sigma", float("nan")), r"`sigma` must be finite, got nan"),
        (lambda: check_positive("sigma", "3"), r"`sigma` must be a number, got '3'"),
        (lambda: check_positive("sigma", True), r"`sigma` must be a number, got True"),
        (lambda: check_non_negative("dilate", -0.5), r"`dilate` must be >= 0, got -0.5"),
        (
            lambda: check_fraction("dose_fraction", 0),
            r"`dose_fraction` must be in \(0, 1\], got 0.0",
        ),
        (
            lambda: check_fraction("dose_fraction", 1.01),
            r"`dose_fraction` must be in \(0, 1\], got 1.01",
        ),
        (lambda: check_in_interval("p", 100.5, 0, 100), r"`p` must be in \[0, 100\], got 100.5"),
        (lambda: check_int("factor", 2.5, minimum=1), r"`factor` must be an integer >= 1, got 2.5"),
        (lambda: check_int("factor", 0, minimum=1), r"`factor` must be an integer >= 1, got 0"),
        (lambda: check_int("n", True), r"`n` must be an integer, got True"),
        (lambda: check_bool("rician", "yes"), r"`rician` must be true or false, got 'yes'"),
        (lambda: check_seed("seed", -3), r"`seed` must be an integer >= 0, got -3"),
        (lambda: check_axis("axis", 3), r"`axis` must be in \[-3, 2\] for a 3D array, got 3"),
        (
            lambda: check_range("sigma_range", (2, 1)),
            r"`sigma_range` must be \(low, high\) with low <= high, got \(2, 1\)",
        ),
        (
            lambda: check_range("sigma_range", (0, 1), minimum=0, min_inclusive=False),
            r"`sigma_range` values must be > 0",
        ),
        (lambda: check_range("r", (0, 2), maximum=1), r"`r` values must be <= 1, got \(0, 2\)"),
        (lambda: check_range("r", "ab"), r"`r` must be a number or a \(low, high\) pair, got 'ab'"),
        (lambda: check_volume_array("x", np.zeros((2, 2))), r"`x` must be 3D, got shape \(2, 2\)"),
        (lambda: check_volume_array("x", np.zeros((0, 2, 2))), r"`x` must not be empty"),
        (
            lambda: check_same_shape("x", np.zeros((2, 2, 2)), "ref", np.zeros((2, 2, 3))),
            r"`x` and `ref` must have the same shape, got \(2, 2, 2\) and \(2, 2, 3\)",
        ),
    ],
)
def test_messages_name_the_parameter(call, message):
    with pytest.raises(ParameterError, match=message):
        call()


def test_cleaned_values():
    assert (
        check_finite("x", np.float32(1.5)) == 1.5
        and type(check_finite("x", np.float32(1.5))) is float
    )
    assert check_int("factor", np.int64(3)) == 3 and type(check_int("factor", np.int64(3))) is int
    assert check_int("factor", 4.0) == 4
    assert check_axis("axis", -3) == 0
    assert check_range("r", 0.3) == (0.3, 0.3)
    assert check_range("r", np.array([1, 2])) == (1.0, 2.0)
    assert check_seed("seed", None) is None
    assert check_bool("b", np.bool_(True)) is True
    assert check_in_interval("p", 0, 0, 1) == 0.0
    with pytest.raises(ParameterError, match=r"`p` must be in \(0, 1\)"):
        check_in_interval("p", 0, 0, 1, low_inclusive=False, high_inclusive=False)


def test_look_up_option_exact_mapping_and_typo():
    assert look_up_option("profile", "box", ("box", "gaussian")) == "box"
    assert look_up_option("kind", "b", {"a": 1, "b": 2}) == 2
    with pytest.raises(
        ParameterError,
        match=r"`profile` must be one of 'box', 'gaussian'; got 'Gausian' \(did you mean 'gaussian'\?\)",
    ):
        look_up_option("profile", "Gausian", ("box", "gaussian"))
    with pytest.raises(ParameterError, match=r"got 'zzz'$"):
        look_up_option("profile", "zzz", ("box", "gaussian"))
    with pytest.raises(ParameterError, match=r"got 3$"):
        look_up_option("profile", 3, ("box", "gaussian"))


def test_literal_options():
    assert literal_options(Literal["a", "b", "c"]) == ("a", "b", "c")
