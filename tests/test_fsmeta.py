"""Reading a file with its xattrs, and writing one with its metadata, as the import's workers,
a commit's walk and a layer's writer do."""

import errno
import os
import stat

import pytest

from cascowfs import cas, fsmeta
from cascowfs.import_workers import read_content


def read_file(path) -> tuple[bytes, tuple]:
    """Content and xattrs as the import reads them (content small enough to join here)."""
    pieces: list = []
    _, xattrs = read_content(os.fsencode(path), lambda stream, emit: pieces.extend(stream))
    return b"".join(p if isinstance(p, bytes) else bytes(p) for p in pieces), xattrs


@pytest.mark.parametrize("size", [0, 1, 4095, 1 << 20, (3 << 20) + 7, cas.STREAM_PIECE * 2 + 9])
def test_read_content_reads_every_byte(tmp_path, size):
    path = tmp_path / "f"
    data = os.urandom(size)
    path.write_bytes(data)
    assert read_file(path) == (data, ())


def test_read_content_does_not_follow_a_symlink(tmp_path):
    (tmp_path / "target").write_bytes(b"x")
    (tmp_path / "link").symlink_to("target")
    with pytest.raises(OSError) as err:
        read_file(tmp_path / "link")
    assert err.value.errno == errno.ELOOP


def _xattrs_supported(path) -> bool:
    try:
        os.setxattr(path, b"user.probe", b"1")
        os.removexattr(path, b"user.probe")
        return True
    except OSError:
        return False


def test_read_content_gives_the_xattrs_sorted_as_read_xattrs_does(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"body")
    if not _xattrs_supported(path):
        pytest.skip(f"no user xattrs on {tmp_path}")
    os.setxattr(path, b"user.zz", b"last")
    os.setxattr(path, b"user.aa", b"")
    data, xattrs = read_file(path)
    assert data == b"body"
    assert xattrs == ((b"user.aa", b""), (b"user.zz", b"last"))
    assert xattrs == fsmeta.read_xattrs(os.fsencode(path))


def test_write_file_gives_content_and_every_piece_of_metadata(tmp_path):
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    xattrs = ((b"user.a", b"1"), (b"user.b", b"\x00\xff")) if _xattrs_supported(probe) else ()
    dst = os.fsencode(tmp_path / "f")
    data = os.urandom((1 << 20) + 3)
    uid, gid = (1234, 5678) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    mode = stat.S_IFREG | (0o4755 if os.geteuid() == 0 else 0o751)
    mtime_ns = 1_600_000_000_123_456_789
    fsmeta.write_file(dst, data, mode, uid, gid, mtime_ns, xattrs)
    st = os.lstat(dst)
    assert (st.st_uid, st.st_gid) == (uid, gid)
    assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(mode)  # set-id kept: chmod after chown
    assert st.st_mtime_ns == mtime_ns  # set last, after the writes and the xattrs
    assert read_file(dst) == (data, xattrs)


def test_write_file_never_overwrites(tmp_path):
    dst = tmp_path / "f"
    dst.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        fsmeta.write_file(os.fsencode(dst), b"new", stat.S_IFREG | 0o644, os.getuid(),
                          os.getgid(), 0)
    assert dst.read_bytes() == b"keep"
