"""Parameter constraints written once, as data, and the checker that enforces them.

A constraint says what one parameter may be; a parameter is valid when it meets any constraint of
its list (the way scikit-learn declares ``_parameter_constraints``, written small for Refinery):

- :class:`Interval` — a number of a kind (``int`` or ``float``) in a range;
- :class:`Options` — one of a fixed set of values (``Options("auto")`` for a keyword);
- :class:`TupleOf` — a tuple whose every item meets the constraints it holds;
- a type such as ``bool`` or ``str`` — any value of it (``bool`` is never taken for a number);
- ``None`` — the value None.

The same constraints validate :class:`core.config.FitConfig`, the detectors and the localizers, and
build the CLI's choices and the Refine form's ranges, so none of them can drift from the others.
A dataclass field declares its constraints, help and form hints once with :func:`param`; :func:`params_of`
reads them back as :class:`Param` records.

Example
-------
>>> check_params("knn", {"n_neighbors": 0}, {"n_neighbors": [Interval(int, 1, None)]})
Traceback (most recent call last):
...
core.errors.ConfigError: knn: n_neighbors must be an int >= 1; got 0
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
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


class TupleOf:
    """A tuple of at least ``min_len`` items, each meeting one of ``constraints``.

    ``TupleOf(Options("stride8", "head"), min_len=1)``: a non-empty tuple of those names.
    """

    def __init__(self, *constraints: Constraint, min_len: int = 0) -> None:
        self.items = tuple(constraints)
        self.min_len = min_len

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, tuple) and len(value) >= self.min_len
                and all(any(accepts(item, part) for item in self.items) for part in value))

    def describe(self) -> str:
        size = "a tuple" if self.min_len == 0 else ("a non-empty tuple" if self.min_len == 1
                                                   else f"a tuple of {self.min_len} or more")
        return f"{size}, each {describe(self.items)}"

    def __repr__(self) -> str:
        return f"TupleOf{self.items!r}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TupleOf) and (other.items, other.min_len) == (self.items, self.min_len)

    def __hash__(self) -> int:
        return hash((self.items, self.min_len))


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


def parse(name: str, text: str, constraints: Iterable[Constraint], error: type[Exception] = ConfigError) -> Any:
    """The value meant by ``text`` typed on a command line or into a form, e.g. ``"auto"`` or ``"0.1"`` for gamma.

    A keyword of an :class:`Options` (any case) comes first, then a number of the :class:`Interval`'s kind,
    then the text itself where ``str`` is allowed. Only the type is read here: the range is
    :func:`check_param`'s. Raises ``error`` naming ``name`` and the allowed values.
    """
    constraints = list(constraints)
    word = text.strip()
    for option in options_of(constraints):
        if isinstance(option, str) and word.lower() == option.lower():
            return option
    interval = interval_of(constraints)
    if interval is not None:
        try:
            return interval.kind(word)
        except ValueError:
            pass
    if str in constraints:
        return word
    raise error(f"{name} must be {describe(constraints)}; got {text!r}")


@dataclass(frozen=True)
class Param:
    """One declared parameter: what it may be, what it does, and how a form offers it.

    Attributes
    ----------
    constraints : tuple
        What the value may be (any one of them), as :func:`check_param` reads them.
    help : str
        What the value does, in a sentence or two of plain words; the CLI's and the form's help.
    label : str or None
        A short name for a form's widget.
    form_min, form_max : int, float or None
        The practical range a form's number widget offers, inside the constraints' range;
        None: the constraints' own end.
    form_values : tuple or None
        The values a form's slider offers, each allowed by the constraints.
    """

    constraints: tuple
    help: str
    label: str | None = None
    form_min: float | None = None
    form_max: float | None = None
    form_values: tuple | None = None

    def __post_init__(self) -> None:
        """A form hint outside the constraints would offer what validation refuses: refuse it here."""
        interval = interval_of(self.constraints)
        for bound in (self.form_min, self.form_max):
            if bound is not None and (interval is None or not interval.accepts(bound)):
                raise ValueError(f"form bound {bound!r} is outside {describe(self.constraints)}")
        for value in self.form_values or ():
            if not any(accepts(constraint, value) for constraint in self.constraints):
                raise ValueError(f"form value {value!r} is outside {describe(self.constraints)}")

    @property
    def is_tuple(self) -> bool:
        """True when the value is a tuple (:class:`TupleOf`): JSON and a command line hold it as a list."""
        return any(isinstance(constraint, TupleOf) for constraint in self.constraints)

    def form_range(self) -> tuple[float, float | None]:
        """The lowest and highest value a form's number widget offers (None: no upper end).

        The constraints' :class:`Interval` narrowed by ``form_min`` / ``form_max``; an open int end
        moves in by one.
        """
        interval = interval_of(self.constraints)
        if interval is None:
            raise ValueError(f"no range in {describe(self.constraints)}")
        low, high = interval.low, interval.high
        if interval.kind is int:
            if low is not None and interval.closed not in ("both", "left"):
                low += 1
            if high is not None and interval.closed not in ("both", "right"):
                high -= 1
        if self.form_min is not None:
            low = self.form_min
        if self.form_max is not None:
            high = self.form_max
        return low, high


def param(default: Any, constraints: Iterable[Constraint], help: str, **form: Any) -> Any:
    """A dataclass field whose :class:`Param` (constraints, help, ``label``, form hints) is in its metadata.

    The default must meet the constraints. Read the declarations back with :func:`params_of`.
    """
    spec = Param(tuple(constraints), help, **form)
    if not any(accepts(constraint, default) for constraint in spec.constraints):
        raise ValueError(f"default {default!r} is not {describe(spec.constraints)}")
    return field(default=default, metadata={"param": spec})


def params_of(cls: type) -> dict[str, Param]:
    """Every field of the dataclass ``cls`` declared with :func:`param`, in field order."""
    return {item.name: item.metadata["param"] for item in fields(cls) if "param" in item.metadata}


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
