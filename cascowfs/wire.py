"""The ctl wire format: what is written to ``MNT/ctl`` and the branch files, and what is read
back. The FUSE layer (``fuse/control.py``, ``fuse/operations.py``) parses with it; the client
(``client.py``) writes commands and reads replies with it; neither imports the other.

Parsing is strict and complete *before* anything is executed: a command that is unknown,
malformed, names an invalid id, or carries a bad label is refused with EINVAL and the store is
not touched.

Grammar (one command per write(2); a single trailing newline is ignored; words are split like a
POSIX shell does, so a label value may be quoted: ``plan="fix the parser"``)::

    branch  <name> <id>                    create a branch on snapshot <id>
    commit  <name> [<id>] [key=value ...] [obs=@<absolute-path>]
                                           freeze a branch (no id: a generated one); obs=@
                                           stores that file (readable by the caller) beside it
    discard <name>                         drop a branch
    prune   <id>                           drop a snapshot
    rebase  <name> [<id>]                  re-base an unmodified branch (no id: the empty snapshot)
    import  <id> <absolute-path> [key=value ...]   import a directory tree as snapshot <id>
                                           (all of it readable by the caller)
    gc                                     reclaim unreferenced objects now
    label   <id> key=value ... key= ...    set labels of a snapshot (key=: remove that one)
    reset   <name> <id>                    drop a branch's changes and re-base it on <id>
    find    <predicate> ... [--sort [-]key] [--limit N] [--parent <id>|--ancestor <id>]
                                           snapshot ids by labels and lineage (episodes.py)
    children [<id>]                        ids of the snapshots whose parent is <id>
                                           (none: of those without a parent)
    push    <remote> [--with-ancestors] <id>...   send snapshots to a remote (docs/remotes.md)
    pull    <remote> [--with-ancestors] <id>...   fetch snapshots from a remote

``find`` and ``children`` change nothing: any caller may send them; every other command needs
root or the admin group.

Replies (one line each, readable from the same open file): ``ok <result>`` or
``error <ERRNO-NAME> <message>``.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import shlex
from dataclasses import dataclass, field

from .episodes import OBS_KEY, FindQuery, parse_find
from .errors import InvalidArgumentError
from .logs import one_line
from .names import (
    check_branch_name,
    check_label_changes,
    check_snapshot_id,
    label_words,
    parse_labels,
)

MAX_COMMAND = 64 * 1024
VERBS = (
    "branch",
    "commit",
    "discard",
    "prune",
    "rebase",
    "import",
    "gc",
    "label",
    "reset",
    "find",
    "children",
    "push",
    "pull",
)
QUERY_VERBS = ("find", "children")  # read-only: open to every caller
WITH_ANCESTORS = "--with-ancestors"


@dataclass(frozen=True, slots=True)
class Command:
    verb: str
    name: str | None = None  # branch name
    id: str | None = None  # snapshot id
    labels: dict[str, str] = field(default_factory=dict)
    src: str | None = None  # import source
    obs: str | None = None  # commit: the observation file's absolute path
    query: FindQuery | None = None  # find
    remote: str | None = None  # push, pull: a remote's name or URL
    ids: tuple[str, ...] = ()  # push, pull: the snapshots
    with_ancestors: bool = False
    # a write to a branch's own commit or parent file: the branch's created_ns when the
    # file was opened (StateManager refuses another branch made since with its name)
    branch_created_ns: int | None = None

    def line(self) -> str:
        """The command in ctl syntax (for logs and replies)."""
        words = [self.verb]
        words += [w for w in (self.name, self.id, self.src, self.remote) if w is not None]
        words += [WITH_ANCESTORS] if self.with_ancestors else []
        words += list(self.ids)
        words += [f"{k}={v}" for k, v in self.labels.items()]
        if self.obs is not None:
            words.append(f"{OBS_KEY}=@{self.obs}")
        if self.query is not None:
            words += self.query.words()
        return command_line(words)


def command_line(words: list[str] | tuple[str, ...]) -> str:
    """Words as one ctl command, each quoted so that ``split_words`` gives them back."""
    return " ".join(shlex.quote(w) for w in words)


def decode_line(data: bytes, what: str = "command") -> str:
    """One line of UTF-8 text from a write(2) buffer, or EINVAL."""
    if len(data) > MAX_COMMAND:
        raise InvalidArgumentError(f"{what} longer than {MAX_COMMAND} bytes")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if b"\n" in data or b"\r" in data:
        raise InvalidArgumentError(f"one {what} per write: got several lines")
    if b"\0" in data:
        raise InvalidArgumentError(f"{what} contains a NUL byte")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"{what} is not UTF-8") from None


# Quotes, backslashes, and whitespace other than space and tab: where a shell's word splitting
# and str.split() may differ.
_NEEDS_SHELL_RULES = re.compile(r"""['"\\]|[^\S \t]""")


def split_words(text: str, what: str = "command") -> list[str]:
    """Split ``text`` into words as a POSIX shell does. Plain lines (nearly every command) are
    split by ``str.split``: shlex walks a line a character at a time in Python, and that cost
    is paid on the FUSE thread, which every request waits for."""
    if not _NEEDS_SHELL_RULES.search(text):
        return text.split()
    try:
        return shlex.split(text, comments=False, posix=True)
    except ValueError as exc:  # unbalanced quotes
        raise InvalidArgumentError(f"malformed {what}: {exc}") from None


def _id_and_labels(words: list[str]) -> tuple[str | None, dict[str, str], str | None]:
    """``[<id>] [key=value ...] [obs=@<path>]``: ids never contain '=', so the first word
    tells which. Returns the id, the labels and the observation's path."""
    ident = None
    if words and "=" not in words[0]:
        ident = check_snapshot_id(words[0])
        words = words[1:]
    obs = None
    marker = f"{OBS_KEY}=@"
    for word in words:
        if word.startswith(marker):
            if obs is not None:
                raise InvalidArgumentError("one obs=@<path> per commit")
            obs = _absolute(word[len(marker) :], "observation path")
    return ident, parse_labels([w for w in words if not w.startswith(marker)]), obs


def _absolute(path: str, what: str) -> str:
    if not os.path.isabs(path):
        raise InvalidArgumentError(f"{what} must be an absolute path: {path[:200]!r}")
    return os.path.normpath(path)


def _arity(words: list[str], lo: int, hi: int, usage: str) -> None:
    if not lo <= len(words) - 1 <= hi:
        raise InvalidArgumentError(f"usage: {usage}")


def parse_command(data: bytes) -> Command:
    """Parse and validate one ctl write; raises InvalidArgumentError (EINVAL) on anything bad."""
    words = split_words(decode_line(data))
    if not words:
        raise InvalidArgumentError("empty command")
    verb = words[0]
    if verb == "branch":
        _arity(words, 2, 2, "branch <name> <id>")
        return Command("branch", name=check_branch_name(words[1]), id=check_snapshot_id(words[2]))
    if verb == "commit":
        if len(words) < 2:
            raise InvalidArgumentError("usage: commit <name> [<id>] [key=value ...]")
        ident, labels, obs = _id_and_labels(words[2:])
        return Command("commit", name=check_branch_name(words[1]), id=ident, labels=labels, obs=obs)
    if verb == "discard":
        _arity(words, 1, 1, "discard <name>")
        return Command("discard", name=check_branch_name(words[1]))
    if verb == "prune":
        _arity(words, 1, 1, "prune <id>")
        return Command("prune", id=check_snapshot_id(words[1]))
    if verb == "rebase":
        _arity(words, 1, 2, "rebase <name> [<id>]")
        ident = check_snapshot_id(words[2]) if len(words) == 3 else None
        return Command("rebase", name=check_branch_name(words[1]), id=ident)
    if verb == "import":
        if len(words) < 3:
            raise InvalidArgumentError("usage: import <id> <absolute-path> [key=value ...]")
        ident = check_snapshot_id(words[1])
        src = _absolute(words[2], "import source")
        return Command("import", id=ident, src=src, labels=parse_labels(words[3:]))
    if verb == "gc":
        _arity(words, 0, 0, "gc")
        return Command("gc")
    if verb == "label":
        if len(words) < 3:
            raise InvalidArgumentError("usage: label <id> key=value ... (key= removes)")
        changes = check_label_changes(label_words(words[2:]))
        return Command("label", id=check_snapshot_id(words[1]), labels=changes)
    if verb == "reset":
        _arity(words, 2, 2, "reset <name> <id>")
        return Command("reset", name=check_branch_name(words[1]), id=check_snapshot_id(words[2]))
    if verb == "find":
        return Command("find", query=parse_find(words[1:]))
    if verb == "children":
        _arity(words, 0, 1, "children [<id>]")
        return Command("children", id=check_snapshot_id(words[1]) if len(words) == 2 else None)
    if verb in ("push", "pull"):
        return _transfer_command(verb, words[1:])
    shown = verb if len(verb) <= 40 else verb[:40] + "..."
    raise InvalidArgumentError(f"unknown command {shown!r}; known: {', '.join(VERBS)}")


def _transfer_command(verb: str, words: list[str]) -> Command:
    """``<remote> [--with-ancestors] <id>...``; the remote is checked when it is resolved."""
    with_ancestors = WITH_ANCESTORS in words
    words = [w for w in words if w != WITH_ANCESTORS]
    if len(words) < 2 or not words[0] or words[0].startswith("-"):
        raise InvalidArgumentError(f"usage: {verb} <remote> [{WITH_ANCESTORS}] <id>...")
    return Command(
        verb,
        remote=words[0],
        ids=tuple(check_snapshot_id(w) for w in words[1:]),
        with_ancestors=with_ancestors,
    )


def parse_parent_write(branch: str, data: bytes) -> Command:
    """A write to ``branches/<name>/parent``: a snapshot id (or an empty line: the empty
    snapshot)."""
    words = split_words(decode_line(data, "parent"), "parent")
    if len(words) > 1:
        raise InvalidArgumentError("write one snapshot id to parent")
    return Command("rebase", name=branch, id=check_snapshot_id(words[0]) if words else None)


def parse_commit_write(branch: str, data: bytes) -> Command:
    """A write to ``branches/<name>/commit``: ``[<id>] [key=value ...]``; empty: generated id."""
    ident, labels, obs = _id_and_labels(split_words(decode_line(data, "commit"), "commit"))
    return Command("commit", name=branch, id=ident, labels=labels, obs=obs)


def ok_reply(result: str) -> bytes:
    return _one_line(f"ok {result}".rstrip()) + b"\n"


def error_reply(code: int, message: str) -> bytes:
    name = _errno.errorcode.get(code, str(code))
    return _one_line(f"error {name} {message}") + b"\n"


def _one_line(text: str) -> bytes:
    """A reply as one line a terminal shows as text: a name a caller chose may hold a
    newline or an escape sequence, escaped here (``logs.one_line``)."""
    return one_line(text).encode("utf-8")


def parse_reply(line: str) -> tuple[bool, int, str]:
    """(ok, errno, text) of one reply line (the client reads replies with it)."""
    line = line.rstrip("\n")
    if line.startswith("ok"):
        return True, 0, line[3:]
    if line.startswith("error "):
        _, name, *rest = line.split(" ", 2)
        code = getattr(_errno, name, None)
        if code is None:
            code = int(name) if name.isdigit() else _errno.EIO
        return False, code, rest[0] if rest else ""
    return False, _errno.EIO, f"unexpected reply {line!r}"
