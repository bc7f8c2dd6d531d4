"""Parameter constraints written once, as data, and the checker that enforces them.

A constraint says what one parameter may be; a parameter is valid when it meets any constraint of
its list (the way scikit-learn declares ``_parameter_constraints``, written small for Refinery):

- :class:`Interval` — a number of a kind (``int`` or ``float``) in a range;
- :class:`Options` — one of a fixed set of values (``Options("auto")`` for a keyword);
- a type such as ``bool`` or ``str`` — any value of it (``bool`` is never taken for a number);
- ``None`` — the value None.

The same constraints validate :class:`core.config.FitConfig`, the detectors and the localizers, and
build the CLI's choices and the Refine form's ranges, so none of them can drift from the others.

Example
-------
>>> check_params("knn", {"n_neighbors": 0}, {"n_neighbors": [Interval(int, 1, None)]})
Traceback (most recent call last):
...
core.errors.ConfigError: knn: n_neighbors must be an int >= 1; got 0
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Iterable, Mapping

from core.errors import ConfigError

Constraint = Any
"""An :class:`Interval`, an :class:`Options`, a type or None."""


@dataclass(frozen=True)
class Interval:
    """Numbers of ``kind`` (``int`` or ``float``) between ``low`` and ``high`` (None: unbounded).

    ``closed`` names the ends that are allowed: ``"both"``, ``"left"``, ``"right"`` or ``"neither"``.
    A float interval takes ints too; an int interval takes only integers.
    """

    kind: type
    low: float | None
    high: float | None
    closed: str = "both"

    def __post_init__(self) -> None:
        if self.kind not in (int, float):
            raise TypeError(f"an Interval holds int or float, not {self.kind!r}")
        if self.closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"closed must be both, left, right or neither; got {self.closed!r}")

    def accepts(self, value: Any) -> bool:
        number_type = Integral if self.kind is int else Real
        if isinstance(value, bool) or not isinstance(value, number_type) or math.isnan(value):
            return False
        if self.low is not None:
            if value < self.low or (value == self.low and self.closed not in ("both", "left")):
                return False
        if self.high is not None:
            if value > self.high or (value == self.high and self.closed not in ("both", "right")):
                return False
        return True

    def describe(self) -> str:
        kind = "an int" if self.kind is int else "a number"
        if self.low is None and self.high is None:
            return kind
        if self.high is None:
            return f"{kind} {'>=' if self.closed in ('both', 'left') else '>'} {_number(self.low)}"
        if self.low is None:
            return f"{kind} {'<=' if self.closed in ('both', 'right') else '<'} {_number(self.high)}"
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        return f"{kind} in {left}{_number(self.low)}, {_number(self.high)}{right}"


class Options:
    """One of a fixed, ordered set of values, e.g. ``Options("gde", "knn")``."""

    def __init__(self, *values: Any) -> None:
        self.values = tuple(values)

    def accepts(self, value: Any) -> bool:
        return any(value == option and type(value) is type(option) for option in self.values)

    def describe(self) -> str:
        shown = [repr(option) if isinstance(option, str) else str(option) for option in self.values]
        return shown[0] if len(shown) == 1 else "one of " + ", ".join(shown)

    def __repr__(self) -> str:
        return f"Options{self.values!r}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Options) and other.values == self.values

    def __hash__(self) -> int:
        return hash(self.values)


def accepts(constraint: Constraint, value: Any) -> bool:
    """True when ``value`` meets this one constraint."""
    if constraint is None:
        return value is None
    if isinstance(constraint, type):
        if constraint in (int, float) and isinstance(value, bool):
            return False
        return isinstance(value, Real if constraint is float else constraint)
    return constraint.accepts(value)


def describe(constraints: Iterable[Constraint]) -> str:
    """The constraints in words, e.g. ``"an int >= 1 or 'auto'"``."""
    words = []
    for constraint in constraints:
        if constraint is None:
            words.append("None")
        elif isinstance(constraint, type):
            words.append({bool: "True or False", str: "a string", int: "an int", float: "a number"}.get(
                constraint, f"a {constraint.__name__}"))
        else:
            words.append(constraint.describe())
    return " or ".join(words)


def check_param(owner: str, name: str, value: Any, constraints: Iterable[Constraint],
                error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` naming ``owner``, ``name``, the allowed values and ``value`` unless it meets a constraint."""
    constraints = list(constraints)
    if not any(accepts(constraint, value) for constraint in constraints):
        prefix = f"{owner}: " if owner else ""
        raise error(f"{prefix}{name} must be {describe(constraints)}; got {value!r}")


def check_params(owner: str, params: Mapping[str, Any], constraints: Mapping[str, Iterable[Constraint]],
                 error: type[Exception] = ConfigError) -> None:
    """Check every parameter of ``params`` that has constraints; the first bad one raises ``error``."""
    for name, allowed in constraints.items():
        if name in params:
            check_param(owner, name, params[name], allowed, error)


def options_of(constraints: Iterable[Constraint]) -> tuple[Any, ...]:
    """The values of every :class:`Options` among ``constraints``, in order (a CLI's or a form's choices)."""
    return tuple(value for constraint in constraints if isinstance(constraint, Options) for value in constraint.values)


def interval_of(constraints: Iterable[Constraint]) -> Interval | None:
    """The first :class:`Interval` among ``constraints``, or None."""
    return next((constraint for constraint in constraints if isinstance(constraint, Interval)), None)


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
