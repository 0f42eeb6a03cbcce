"""One validator per kind of parameter, and string options with a "did you mean ...?".

Every check takes the parameter's *name* so that its message can say which argument is wrong
and what to do, e.g. ``"`sigma` must be > 0, got -1"``. Checks return the cleaned value
(a Python ``float``/``int``/``tuple``) so callers can write ``sigma = check_positive("sigma",
sigma)``. They raise :class:`ParameterError`, which is both a :class:`ValueError` (what Python
code expects from a bad argument) and a :class:`medgen.errors.MedgenError` (what the CLI prints
as one line, without a traceback).

This module imports only numpy, so every layer may use it.
"""

from __future__ import annotations

import difflib
import math
import numbers
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from medgen.errors import MedgenError

__all__ = [
    "ParameterError",
    "check_axis",
    "check_bool",
    "check_finite",
    "check_fraction",
    "check_in_interval",
    "check_int",
    "check_non_negative",
    "check_positive",
    "check_range",
    "check_same_shape",
    "check_seed",
    "check_volume_array",
    "literal_options",
    "look_up_option",
]

T = TypeVar("T")


class ParameterError(MedgenError, ValueError):
    """A function or config parameter has an unusable value; the message names it."""


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_finite(name: str, value: Any) -> float:
    """``value`` as a finite float.

    Examples
    --------
    >>> check_finite("offset_hu", -1000)
    -1000.0
    """
    if not _is_real(value):
        raise ParameterError(f"`{name}` must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ParameterError(f"`{name}` must be finite, got {value}")
    return value


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float > 0.

    Examples
    --------
    >>> check_positive("sigma", 2)
    2.0
    >>> check_positive("sigma", -1)
    Traceback (most recent call last):
    ...
    medgen.validate.ParameterError: `sigma` must be > 0, got -1.0
    """
    value = check_finite(name, value)
    if not value > 0:
        raise ParameterError(f"`{name}` must be > 0, got {value}")
    return value


def check_non_negative(name: str, value: Any) -> float:
    """``value`` as a float >= 0."""
    value = check_finite(name, value)
    if value < 0:
        raise ParameterError(f"`{name}` must be >= 0, got {value}")
    return value


def check_in_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """``value`` as a float inside the interval from ``low`` to ``high``.

    Examples
    --------
    >>> check_in_interval("keep_fraction", 1.5, 0, 1, low_inclusive=False)
    Traceback (most recent call last):
    ...
    medgen.validate.ParameterError: `keep_fraction` must be in (0, 1], got 1.5
    """
    value = check_finite(name, value)
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (above and below):
        interval = (
            f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
        )
        raise ParameterError(f"`{name}` must be in {interval}, got {value}")
    return value


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float in (0, 1] (a fraction of something that cannot be empty)."""
    return check_in_interval(name, value, 0.0, 1.0, low_inclusive=False)


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as an int (numpy integers and integral floats such as ``2.0`` accepted).

    Examples
    --------
    >>> check_int("factor", 3.0, minimum=2)
    3
    >>> check_int("factor", 1, minimum=2)
    Traceback (most recent call last):
    ...
    medgen.validate.ParameterError: `factor` must be an integer >= 2, got 1
    """
    need = "an integer" if minimum is None else f"an integer >= {minimum}"
    if isinstance(value, bool) or not _is_real(value):
        raise ParameterError(f"`{name}` must be {need}, got {value!r}")
    if isinstance(value, numbers.Integral):
        as_int = int(value)
    elif math.isfinite(float(value)) and float(value).is_integer():
        as_int = int(value)
    else:
        raise ParameterError(f"`{name}` must be {need}, got {value!r}")
    if minimum is not None and as_int < minimum:
        raise ParameterError(f"`{name}` must be {need}, got {as_int}")
    return as_int


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool; strings and numbers are refused rather than guessed at."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ParameterError(f"`{name}` must be true or false, got {value!r}")


def check_seed(name: str, value: Any) -> int | None:
    """A random seed: ``None`` (fresh entropy on every use) or an integer >= 0."""
    if value is None:
        return None
    return check_int(name, value, minimum=0)


def check_range(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
) -> tuple[float, float]:
    """A ``(low, high)`` range with ``low <= high``, both within the allowed bounds.

    A single number ``v`` means the fixed range ``(v, v)``.

    Examples
    --------
    >>> check_range("sigma_range", [0.01, 0.05], minimum=0, min_inclusive=False)
    (0.01, 0.05)
    >>> check_range("sigma_range", (0.05, 0.01))
    Traceback (most recent call last):
    ...
    medgen.validate.ParameterError: `sigma_range` must be (low, high) with low <= high, got (0.05, 0.01)
    """
    if _is_real(value):
        pair: tuple[Any, ...] = (value, value)
    elif (
        isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str) and len(value) == 2
    ):
        pair = tuple(value)
    else:
        raise ParameterError(f"`{name}` must be a number or a (low, high) pair, got {value!r}")
    low, high = (check_finite(name, v) for v in pair)
    if low > high:
        raise ParameterError(
            f"`{name}` must be (low, high) with low <= high, got ({low:g}, {high:g})"
        )
    if minimum is not None and (low < minimum or (not min_inclusive and low == minimum)):
        sign = ">=" if min_inclusive else ">"
        raise ParameterError(f"`{name}` values must be {sign} {minimum:g}, got ({low:g}, {high:g})")
    if maximum is not None and high > maximum:
        raise ParameterError(f"`{name}` values must be <= {maximum:g}, got ({low:g}, {high:g})")
    return low, high


def check_axis(name: str, axis: Any, ndim: int = 3) -> int:
    """An axis index in ``[-ndim, ndim)``, returned as a non-negative int.

    Examples
    --------
    >>> check_axis("axis", -1)
    2
    """
    axis = check_int(name, axis)
    if not -ndim <= axis < ndim:
        raise ParameterError(
            f"`{name}` must be in [{-ndim}, {ndim - 1}] for a {ndim}D array, got {axis}"
        )
    return axis % ndim


def check_volume_array(name: str, array: Any, ndim: int = 3, dtype: Any = np.float32) -> np.ndarray:
    """``array`` as a numpy array of ``ndim`` dimensions and ``dtype`` (copied only if needed).

    The result may share memory with the input: callers must not write into it in place.
    """
    try:
        out = np.asarray(array, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ParameterError(
            f"`{name}` must be a numeric array, got {type(array).__name__}"
        ) from exc
    if out.ndim != ndim:
        raise ParameterError(f"`{name}` must be {ndim}D, got shape {out.shape}")
    if out.size == 0:
        raise ParameterError(f"`{name}` must not be empty, got shape {out.shape}")
    return out


def check_same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    """Refuse two arrays whose shapes differ, naming both."""
    if np.shape(a) != np.shape(b):
        raise ParameterError(
            f"`{name_a}` and `{name_b}` must have the same shape, got {np.shape(a)} and {np.shape(b)}"
        )


def literal_options(literal: Any) -> tuple[str, ...]:
    """The strings allowed by a ``typing.Literal`` type.

    Examples
    --------
    >>> from typing import Literal
    >>> literal_options(Literal["box", "gaussian"])
    ('box', 'gaussian')
    """
    return tuple(typing.get_args(literal))


def look_up_option(name: str, value: Any, options: Iterable[str] | Mapping[str, T]) -> Any:
    """Match a string option exactly; on a typo say which options exist and the closest one.

    Parameters
    ----------
    name : str
        The parameter's name, for the message.
    value : str
        What the user gave.
    options : iterable of str, or mapping from str
        The allowed options (e.g. ``literal_options(Profile)``); for a mapping the value stored
        under the matched key is returned, otherwise the matched option itself.

    Examples
    --------
    >>> look_up_option("profile", "box", ("box", "gaussian"))
    'box'
    >>> look_up_option("profile", "gausian", ("box", "gaussian"))
    Traceback (most recent call last):
    ...
    medgen.validate.ParameterError: `profile` must be one of 'box', 'gaussian'; got 'gausian' (did you mean 'gaussian'?)
    """
    choices = list(options.keys()) if isinstance(options, Mapping) else list(options)
    if isinstance(value, str) and value in choices:
        return options[value] if isinstance(options, Mapping) else value
    listed = ", ".join(repr(c) for c in choices)
    hint = ""
    if isinstance(value, str):
        lowered = {c.lower(): c for c in choices}
        close = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=0.6)
        if close:
            hint = f" (did you mean {lowered[close[0]]!r}?)"
    raise ParameterError(f"`{name}` must be one of {listed}; got {value!r}{hint}")
