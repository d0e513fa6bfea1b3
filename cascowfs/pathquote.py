"""Paths in line-oriented output, quoted as git quotes them (``core.quotePath=true``).

A file name may hold any byte but NUL and ``/``: a newline in a name would otherwise end a
``status`` line early and forge the next one (``$'x\\nD victim'`` reading as "victim was
deleted"). So every path printed one per line goes through ``quote``: a path made only of
printable ASCII other than ``"`` and ``\\`` is written bare; any other path is wrapped in
double quotes, with ``\\a \\b \\t \\n \\v \\f \\r \\" \\\\`` for those bytes and ``\\ooo`` (three
octal digits) for every other byte below 0x20, 0x7f and every byte from 0x80 up. A quoted path
is pure ASCII and holds no newline, and ``unquote`` gives back the exact bytes.

Inside cascowfs a path is a ``str`` decoded from UTF-8 with ``surrogateescape`` (as ``os``
gives names): ``path_bytes``/``path_text`` convert exactly, whatever the bytes.
"""

from __future__ import annotations

from .errors import InvalidArgumentError

_ESCAPES = {
    0x07: "a",
    0x08: "b",
    0x09: "t",
    0x0A: "n",
    0x0B: "v",
    0x0C: "f",
    0x0D: "r",
    0x22: '"',
    0x5C: "\\",
}
_UNESCAPES = {ord(letter): byte for byte, letter in _ESCAPES.items()}


def path_bytes(path: str | bytes) -> bytes:
    """The exact bytes of a path held as str (surrogateescape) or bytes."""
    return path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")


def path_text(path: str | bytes) -> str:
    """The str form of a path (undecodable bytes as surrogates), exact both ways."""
    return path if isinstance(path, str) else path.decode("utf-8", "surrogateescape")


def _needs_escape(byte: int) -> bool:
    return byte < 0x20 or byte >= 0x7F or byte in (0x22, 0x5C)


def quote(path: str | bytes) -> str:
    """``path`` as one unambiguous, newline-free ASCII word (git's C-style quoting)."""
    raw = path_bytes(path)
    if not any(_needs_escape(byte) for byte in raw):
        return raw.decode("ascii")
    out = ['"']
    for byte in raw:
        if byte in _ESCAPES:
            out.append("\\" + _ESCAPES[byte])
        elif _needs_escape(byte):
            out.append(f"\\{byte:03o}")
        else:
            out.append(chr(byte))
    out.append('"')
    return "".join(out)


def unquote(text: str) -> bytes:
    """The exact bytes that ``quote`` wrote as ``text`` (a bare path is taken as it is)."""
    if not text.startswith('"'):
        return text.encode("utf-8", "surrogateescape")
    if len(text) < 2 or not text.endswith('"'):
        raise InvalidArgumentError(f"malformed quoted path {text!r}: no closing quote")
    try:
        body = text[1:-1].encode("ascii")
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"malformed quoted path {text!r}: not ASCII") from None
    out = bytearray()
    pos = 0
    while pos < len(body):
        byte = body[pos]
        if byte == 0x22:
            raise InvalidArgumentError(f"malformed quoted path {text!r}: unescaped quote")
        if byte != 0x5C:
            out.append(byte)
            pos += 1
            continue
        escape = body[pos + 1 : pos + 2]
        if escape and escape[0] in _UNESCAPES:
            out.append(_UNESCAPES[escape[0]])
            pos += 2
            continue
        digits = body[pos + 1 : pos + 4]
        if len(digits) == 3 and all(0x30 <= d <= 0x37 for d in digits) and int(digits, 8) < 256:
            out.append(int(digits, 8))
            pos += 4
            continue
        raise InvalidArgumentError(f"malformed quoted path {text!r}: bad escape at {pos}")
    return bytes(out)
