"""Rules for configuration values, checked before any work starts: each says what a value must
be, and its message names the option and shows (shortened) what it got; and the defaults of
the configuration dataclasses' fields.

Numbers are finite (NaN and infinities are refused, and so are ints too large for a float);
integers fit in 64 bits; ``True`` / ``False`` are booleans, never numbers, and only they are
booleans (the string ``"false"`` is not false).
"""

from __future__ import annotations

import math
import os
import reprlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, Field, dataclass
from typing import Any

__all__ = [
    "BOOLEAN",
    "COUNT",
    "PATH",
    "SEED",
    "Rule",
    "field_default",
    "first_problem",
    "integer",
    "number",
    "one_of",
    "optional",
    "shown",
]

_INT64_MAX = 2**63 - 1

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60  # a 1 MB string is shown by its first characters
_short.maxlevel, _short.maxlist, _short.maxdict = 2, 4, 4  # YAML aliases can nest exponentially


def shown(value: Any) -> str:
    """``repr(value)``, shortened to a line: a bad value is quoted in the message, not copied."""
    return _short.repr(value)


@dataclass(frozen=True)
class Rule:
    """What a value must be: ``accepts`` tests it, ``must`` says it ("be a positive integer")."""

    must: str
    accepts: Callable[[Any], bool]

    def problem(self, name: str, value: Any) -> str | None:
        """The message for a bad ``value`` of option ``name``; None when the value is good."""
        if self.accepts(value):
            return None
        return f"{name} must {self.must}, got {shown(value)}"


@dataclass(frozen=True)
class _Choice(Rule):
    """Its message reads as the trainer's always have: "unknown method 'rl'; expected ..."."""

    choices: tuple[str, ...] = ()

    def problem(self, name: str, value: Any) -> str | None:
        if self.accepts(value):
            return None
        return f"unknown {name} {shown(value)}; expected one of {self.choices}"


def field_default(field: Field) -> Any:
    """A dataclass field's default (its factory's value where it has one); ``MISSING`` where
    it has none."""
    if field.default_factory is not MISSING:
        return field.default_factory()
    return field.default


def one_of(choices: Collection[str]) -> Rule:
    """One of a fixed set of strings."""
    choices = tuple(choices)
    return _Choice(f"be one of {choices}", lambda value: _is(value, str) and value in choices,
                   choices)


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    """``isinstance`` without bool passing for a number (``True`` is an int to Python)."""
    return isinstance(value, kind) and not isinstance(value, bool)


def integer(minimum: int, maximum: int = _INT64_MAX) -> Rule:
    """An int in ``[minimum, maximum]`` (a float such as 8.0 is refused: counts are whole)."""
    if maximum != _INT64_MAX:
        must = f"be an integer in [{minimum}, {maximum}]"
    elif minimum in (0, 1):
        must = "be a positive integer" if minimum else "be a non-negative integer"
    else:
        must = f"be an integer of at least {minimum}"
    return Rule(must, lambda value: _is(value, int) and minimum <= value <= maximum)


def number(
    minimum: float = -math.inf,
    maximum: float = math.inf,
    *,
    above: bool = False,
    below: bool = False,
    must: str,
) -> Rule:
    """A finite int or float between ``minimum`` and ``maximum`` (excluded with ``above`` /
    ``below``)."""

    def accepts(value: Any) -> bool:
        if not _is(value, (int, float)):
            return False
        try:
            value = float(value)
        except OverflowError:  # an int beyond float's range
            return False
        return (
            math.isfinite(value)
            and (value > minimum if above else value >= minimum)
            and (value < maximum if below else value <= maximum)
        )

    return Rule(must, accepts)


def optional(rule: Rule) -> Rule:
    """``rule``, or None."""
    return Rule(f"{rule.must} or None", lambda value: value is None or rule.accepts(value))


def first_problem(values: Mapping[str, Any], rules: Mapping[str, Rule]) -> str | None:
    """The message of the first value in ``values`` that breaks its rule in ``rules``."""
    for name, rule in rules.items():
        problem = rule.problem(name, values[name])
        if problem:
            return problem
    return None


BOOLEAN = Rule("be true or false", lambda value: isinstance(value, bool))
COUNT = integer(1)
SEED = integer(0, 2**32 - 1)  # numpy's seeds are 32-bit
PATH = Rule(
    "be a path (a non-empty string)",
    lambda value: _is(value, (str, os.PathLike)) and str(value) != "",
)
