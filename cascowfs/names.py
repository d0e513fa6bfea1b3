"""Validation of user-chosen snapshot ids, branch names and labels (docs/interface.md: ids and
names, Label limits)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from .errors import InvalidArgumentError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LABEL_KEY_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}"
_LABEL_KEY_RE = re.compile(LABEL_KEY_PATTERN)
# Where a commit's large observation goes (``obs=@/path``), so never the key of a label.
RESERVED_LABEL_KEYS = frozenset({"obs"})
# C0 controls and DEL: a label is shown on one line by `cascowfs ls`/`log` and by getfattr.
_LABEL_VALUE_FORBIDDEN_RE = re.compile(r"[\x00-\x1f\x7f]")
# A label value that is a decimal number (not nan, inf, hex or with spaces): find compares
# and sorts such values as numbers.
LABEL_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")

# A snapshot root serves every label as the xattr user.cascowfs.label.<key>, beside the other
# recorded names, and the kernel refuses a listxattr list or an xattr value over 64 KiB
# (XATTR_LIST_MAX, XATTR_SIZE_MAX). At these caps the label names take at most
# 128 * 85 = 10,880 bytes of the list and names plus values at most 43,648 bytes, which leaves
# the root directory's own xattrs more than 20 KiB of the list.
MAX_LABELS = 128
MAX_LABEL_VALUE_CHARS = 4096
MAX_LABELS_BYTES = 32768  # UTF-8 bytes of every key and value together


def _as_text(value: object, what: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"invalid {what}: not UTF-8: {value!r}") from None
    if not isinstance(value, str):
        raise InvalidArgumentError(f"invalid {what}: {value!r} is not a string")
    return value


def label_number(text: str) -> float | None:
    """The value as a number if it is one (``LABEL_NUMBER_RE``), else None."""
    return float(text) if LABEL_NUMBER_RE.fullmatch(text) else None


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
    """Labels are ``key=value`` pairs: keys short identifiers, values UTF-8 without control
    characters; at most ``MAX_LABELS`` of them and ``MAX_LABELS_BYTES`` in all. Anything
    but a mapping (a remote's ref says what it likes) is EINVAL."""
    if labels is not None and not isinstance(labels, Mapping):
        raise InvalidArgumentError(f"labels are a {type(labels).__name__}, not key=value pairs")
    if not labels:
        return {}
    out = {check_label_key(key): check_label_value(key, val) for key, val in labels.items()}
    problem = labels_over_limits(out)
    if problem:
        raise InvalidArgumentError(problem)
    return out


def check_label_key(value: object) -> str:
    key = _as_text(value, "label key")
    if not _LABEL_KEY_RE.fullmatch(key):
        raise InvalidArgumentError(
            f"invalid label key {key[:80]!r}: must match [A-Za-z0-9_][A-Za-z0-9._-]{{0,63}}"
        )
    if key in RESERVED_LABEL_KEYS:
        raise InvalidArgumentError(f"label key {key!r} is reserved (a commit's obs=@/path)")
    return key


def check_label_value(key: str, value: object) -> str:
    val = _as_text(value, "label value")
    if _LABEL_VALUE_FORBIDDEN_RE.search(val) or len(val) > MAX_LABEL_VALUE_CHARS:
        raise InvalidArgumentError(
            f"invalid value for label {key!r}: no control characters, at most "
            f"{MAX_LABEL_VALUE_CHARS} characters"
        )
    return val


def check_label_changes(changes: dict[str, str]) -> dict[str, str]:
    """A ``label`` command's changes: valid keys, each with a valid value or "" (remove it);
    at least one. The caps apply to the labels the changes leave (``labels_over_limits``)."""
    if not changes:
        raise InvalidArgumentError("label: give at least one key=value (key= removes)")
    return {check_label_key(key): check_label_value(key, val) for key, val in changes.items()}


def labels_over_limits(labels: dict[str, str]) -> str | None:
    """Why this label set exceeds the count or size cap, or None if it fits."""
    if len(labels) > MAX_LABELS:
        return f"too many labels: {len(labels)}, at most {MAX_LABELS}"
    size = sum(
        len(key.encode()) + len(val.encode("utf-8", "surrogateescape"))
        for key, val in labels.items()
    )
    if size > MAX_LABELS_BYTES:
        return f"labels too large: {size} bytes of keys and values, at most {MAX_LABELS_BYTES}"
    return None


def label_words(words: list[str]) -> dict[str, str]:
    """``key=value`` words (as given on a ctl line or the CLI) as a dict, not checked."""
    labels: dict[str, str] = {}
    for word in words:
        key, sep, val = word.partition("=")
        if not sep:
            raise InvalidArgumentError(f"invalid label {word[:80]!r}: expected key=value")
        labels[key] = val
    return labels


def parse_labels(words: list[str]) -> dict[str, str]:
    """Parse ``key=value`` words (as given on a ctl line or the CLI)."""
    return check_labels(label_words(words))
