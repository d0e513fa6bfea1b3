"""Validation of user-chosen snapshot ids and branch names (docs/interface.md: ids and names)."""

from __future__ import annotations

import re

from .errors import InvalidArgumentError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_LABEL_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def _as_text(value: object, what: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"invalid {what}: not UTF-8: {value!r}") from None
    if not isinstance(value, str):
        raise InvalidArgumentError(f"invalid {what}: {value!r} is not a string")
    return value


def check_name(value: object, what: str = "name") -> str:
    """Return ``value`` as str if it is a valid id/name, else raise InvalidArgumentError."""
    text = _as_text(value, what)
    if not _NAME_RE.fullmatch(text):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise InvalidArgumentError(
            f"invalid {what} {shown!r}: must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}"
        )
    return text


def check_snapshot_id(value: object) -> str:
    return check_name(value, "snapshot id")


def check_branch_name(value: object) -> str:
    return check_name(value, "branch name")


def check_labels(labels: dict[str, str] | None) -> dict[str, str]:
    """Labels are ``key=value`` pairs; keys are short identifiers, values any UTF-8 without
    NUL/newline."""
    if not labels:
        return {}
    out: dict[str, str] = {}
    for key, val in labels.items():
        key = _as_text(key, "label key")
        val = _as_text(val, "label value")
        if not _LABEL_KEY_RE.fullmatch(key):
            raise InvalidArgumentError(f"invalid label key {key!r}")
        if "\n" in val or "\0" in val or len(val) > 4096:
            raise InvalidArgumentError(f"invalid value for label {key!r}: no newline/NUL, "
                                       "at most 4096 chars")
        out[key] = val
    return out


def parse_labels(words: list[str]) -> dict[str, str]:
    """Parse ``key=value`` words (as given on a ctl line or the CLI)."""
    labels: dict[str, str] = {}
    for word in words:
        key, sep, val = word.partition("=")
        if not sep:
            raise InvalidArgumentError(f"invalid label {word!r}: expected key=value")
        labels[key] = val
    return check_labels(labels)
