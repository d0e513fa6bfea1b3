"""The ctl wire format (``wire.py``): what the client writes is what the FUSE layer parses,
and every reply line reads back as the outcome it reports."""

from __future__ import annotations

import errno

from hypothesis import given, strategies as st

from cascowfs import wire
from cascowfs.errors import InvalidArgumentError
from cascowfs.logs import one_line

from conftest import hypothesis_settings

# words a command may carry: anything printable on one line, quotes and backslashes included
words = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1,
                max_size=30)
ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True).filter(
    lambda s: s not in (".", ".."))
labels = st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
                         st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")),
                                 max_size=30), max_size=4)


@hypothesis_settings(300)
@given(ws=st.lists(words, min_size=1, max_size=6))
def test_quoted_words_split_back_into_the_same_words(ws):
    assert wire.split_words(wire.command_line(ws)) == ws


@hypothesis_settings(200)
@given(name=ids, id=ids, labels=labels)
def test_a_commit_line_the_client_writes_parses_into_the_same_command(name, id, labels):
    try:
        want = wire.Command("commit", name=name, id=id, labels=labels)
        line = (want.line() + "\n").encode()
        got = wire.parse_command(line)
    except InvalidArgumentError:
        return  # a name or label the validators refuse is refused for either side alike
    assert got == want


@hypothesis_settings(200)
@given(result=st.text(max_size=80))
def test_an_ok_reply_reads_back_as_success_with_its_result_on_one_line(result):
    line = wire.ok_reply(result)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    ok, code, text = wire.parse_reply(line.decode())
    assert ok and code == 0 and text.isprintable()
    assert text == one_line(f"ok {result}".rstrip())[3:]


@hypothesis_settings(100)
@given(code=st.sampled_from([errno.EINVAL, errno.EBUSY, errno.ENOENT, errno.EEXIST,
                             errno.ENOSPC, errno.EIO]), message=st.text(max_size=80))
def test_an_error_reply_reads_back_as_its_errno(code, message):
    ok, got, _ = wire.parse_reply(wire.error_reply(code, message).decode())
    assert not ok and got == code


def test_a_line_that_is_no_reply_reads_as_an_io_error():
    assert wire.parse_reply("surprise\n") == (False, errno.EIO, "unexpected reply 'surprise'")


def test_an_error_reply_shows_a_hostile_name_escaped_on_one_printable_line():
    """A message naming a file an agent chose: the reply reaches root's terminal (the CLI
    prints it) with no control in it, the name still there in its escaped form."""
    name = "x\x1b]0;PWNED\x07\x1b[2J\x9b31m\nFAKE\u2028\u0085\u202e\x7f\udc9b"
    line = wire.error_reply(errno.EBUSY, f"{name}: changed while it was read").decode("utf-8")
    assert line.endswith("\n") and line[:-1].isprintable(), line
    assert "x\\x1b]0;PWNED\\x07\\x1b[2J\\x9b31m\\nFAKE\\u2028\\x85\\u202e\\x7f\\x9b" in line
