"""Label predicates for ``remote ls-snapshots --find``: ``KEY=V``, ``KEY!=V``, ``KEY<N``,
``KEY<=N``, ``KEY>N``, ``KEY>=N`` (numbers compared as numbers) and ``KEY`` (has the label).
A snapshot matches when every predicate holds."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable

from ..errors import InvalidArgumentError

_PREDICATE = re.compile(r"([^=!<>]+)(=|!=|<=|>=|<|>)?(.*)", re.S)
_NUMERIC = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}

Match = Callable[[dict[str, str]], bool]


def _one(text: str) -> Match:
    m = _PREDICATE.fullmatch(text)
    if m is None or (m.group(2) is None and m.group(3)):
        raise InvalidArgumentError(f"predicate {text!r}: give KEY, KEY=V, KEY!=V or KEY<N ...")
    key, op, value = m.group(1), m.group(2), m.group(3)
    if op is None:
        return lambda labels: key in labels
    if op == "=":
        return lambda labels: labels.get(key) == value
    if op == "!=":
        return lambda labels: labels.get(key) != value
    try:
        bound = float(value)
    except ValueError:
        raise InvalidArgumentError(f"predicate {text!r}: {value!r} is not a number") from None
    compare = _NUMERIC[op]

    def numeric(labels: dict[str, str]) -> bool:
        try:
            return compare(float(labels[key]), bound)
        except (KeyError, ValueError):
            return False

    return numeric


def parse(predicates: list[str]) -> Match:
    checks = [_one(p) for p in predicates]
    return lambda labels: all(check(labels) for check in checks)
