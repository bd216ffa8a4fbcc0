"""Argument checks shared by the router, the loss weightings and the recipe's configuration.

Every check returns the value in its canonical Python type or raises early with a message that
names the argument and the values it accepts (TypeError for the wrong kind of value, ValueError for
a value out of range).  NaN and infinities are out of range for every float check.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable
from typing import Any


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (numpy integers accepted, bools not) with ``minimum <= value <= maximum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int{_int_range(minimum, maximum)}, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int{_int_range(minimum, maximum)}, got {type(value).__name__}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an int{_int_range(minimum, maximum)}, got {value}")
    return value


def check_float(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """A finite real number in the interval ``low``..``high`` (each end closed unless ``*_open``)."""
    allowed = _interval(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number {allowed}{hint}, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be {allowed}{hint}, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """One of ``choices`` (compared as given; no case folding)."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_sharing_ratio(value: Any) -> float:
    """DTR's beta: the fraction of channels each task activates, in (0, 1] (1 = no routing)."""
    return check_float(value, "sharing_ratio", low=0.0, high=1.0, low_open=True)


def check_alpha(value: Any) -> float:
    """DTR's alpha: the exponent of the window schedule, a finite number > 0."""
    return check_float(value, "alpha", low=0.0, low_open=True)


def check_channel_axis(value: Any) -> int:
    """The axis a mask acts on: any int but 0, the batch axis (its upper bound depends on the tensor)."""
    value = check_int(value, "channel_axis")
    if value == 0:
        raise ValueError("channel_axis must not be 0 (the batch axis); use 1 for channels-first, -1 for channels-last")
    return value


def check_seed(value: Any) -> int:
    """A seed: any int (used modulo 2**32)."""
    if isinstance(value, bool):
        raise TypeError("seed must be an int or None, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"seed must be an int or None, got {type(value).__name__}") from None


def _int_range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"
