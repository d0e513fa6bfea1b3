"""Reading a file's contents, as the import's workers and a commit's walk do."""

import errno
import os

import pytest

from cascowfs import fsmeta


@pytest.mark.parametrize("size", [0, 1, 4095, 1 << 20, (3 << 20) + 7])
def test_read_file_data_reads_every_byte(tmp_path, size):
    path = tmp_path / "f"
    data = os.urandom(size)
    path.write_bytes(data)
    assert fsmeta.read_file_data(os.fsencode(path)) == data


def test_read_file_data_does_not_follow_a_symlink(tmp_path):
    (tmp_path / "target").write_bytes(b"x")
    (tmp_path / "link").symlink_to("target")
    with pytest.raises(OSError) as err:
        fsmeta.read_file_data(os.fsencode(tmp_path / "link"))
    assert err.value.errno == errno.ELOOP
