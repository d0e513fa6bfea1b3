"""Remotes through a running daemon: the CLI (``push``/``pull``/``remote``), the client and
ctl, against the S3 server on 127.0.0.1; a pulled snapshot served under MNT/snapshots/."""

from __future__ import annotations

import errno
import json
import subprocess

import pytest

from fusehelpers import make_source_tree, mounted, needs_fuse, run_cli
from support.s3server import new_bucket, s3_server, set_credentials
from cascowfs.cli import exit_status
from cascowfs.client import Client
from cascowfs.errors import NotFoundError

pytestmark = needs_fuse


@pytest.fixture(scope="module")
def endpoint():
    set_credentials()  # the daemons inherit them: credentials the standard AWS way
    with s3_server() as url:
        yield url


def test_round_trip_between_two_mounts(endpoint):
    bucket = new_bucket(endpoint)
    with mounted() as a, mounted() as b:
        src = make_source_tree(a.base / "src", stdlib_slice=40)
        for fs in (a, b):
            run_cli("remote", "add", str(fs.mnt), "origin", f"s3://{bucket}/team",
                    "--endpoint-url", endpoint)
        assert run_cli("remote", "ls", str(b.store)).stdout == (
            f"origin\ts3://{bucket}/team endpoint={endpoint}\n")
        record = {"name": "origin", "url": f"s3://{bucket}/team", "endpoint_url": endpoint}
        for argv in (("remote", "ls", str(b.store), "--json"),
                     ("remote", "--json", "ls", str(b.store))):
            assert json.loads(run_cli(*argv).stdout) == record, argv
        with Client(a.mnt) as client:
            client.import_tree(src, "base", {"task": "t1"})
            tree = client.branch("w", "base")
            (tree / "added.txt").write_text("an agent's edit\n")
            trace = a.base / "trace.log"
            trace.write_bytes(b"test output\n" * 50_000)
            client.commit("w", "step1", {"reward": "0.9"}, obs=trace)
            client.discard("w")
            assert client.push("origin", ["base"]) == ["base"]
        pushed = run_cli("push", str(a.mnt), "origin", "step1", "--json")  # through ctl
        assert json.loads(pushed.stdout) == {"snapshots": ["step1"]}
        listed = run_cli("remote", "ls-snapshots", str(b.mnt), "origin", "--find", "reward>0.5")
        assert listed.stdout == "step1\tbase\treward=0.9\n"
        listed = run_cli("remote", "ls-snapshots", str(b.mnt), "origin", "--find", "has:obs")
        assert listed.stdout == "step1\tbase\treward=0.9\n"
        listed = run_cli("remote", "ls-snapshots", str(b.mnt), "origin", "--json")
        assert [json.loads(line) for line in listed.stdout.splitlines()] == [
            {"id": "base", "parent": None, "labels": {"task": "t1"}, "obs": False},
            {"id": "step1", "parent": "base", "labels": {"reward": "0.9"}, "obs": True}]
        # ctl itself, as a shell script would
        code, reply = b.ctl("pull origin --with-ancestors step1")
        assert (code, reply) == (0, "ok base step1")
        with Client(b.mnt) as client:
            assert client.snapshot("step1").parent == "base"
            assert client.snapshot("step1").labels == {"reward": "0.9"}
            assert client.snapshot("base").labels == {"task": "t1"}
        for id in ("base", "step1"):
            subprocess.run(["diff", "-r", "--no-dereference", a.mnt / "snapshots" / id,
                            b.mnt / "snapshots" / id], check=True)
        # the observation came with its snapshot
        assert (b.mnt / "observations" / "step1").read_bytes() == trace.read_bytes()
        # and a branch on the pulled snapshot mounts its layers
        with Client(b.mnt) as client:
            tree = client.branch("again", "step1")
            assert (tree / "added.txt").read_text() == "an agent's edit\n"
            client.discard("again")
        pruned = json.loads(run_cli("remote", "prune", str(b.mnt), "origin", "--json").stdout)
        assert pruned["snapshots"] == 2 and pruned["packs_deleted"] == 0, pruned


def test_errors_name_the_remote_and_the_object(endpoint):
    bucket = new_bucket(endpoint)
    with mounted() as fs:
        run_cli("remote", "add", str(fs.mnt), "origin", f"s3://{bucket}",
                "--endpoint-url", endpoint)
        with Client(fs.mnt) as client:
            with pytest.raises(NotFoundError, match=f"origin \\(s3://{bucket}\\): no object "
                                                    "snapshots/absent"):
                client.pull("origin", ["absent"])
            with pytest.raises(NotFoundError, match="no remote 'nowhere'"):
                client.push("nowhere", ["x"])
        proc = run_cli("pull", str(fs.mnt), "origin", "absent", check=False)
        assert proc.returncode == exit_status(errno.ENOENT)
        assert proc.stderr.startswith("cascowfs pull: ENOENT: remote origin")
        assert "snapshots/absent" in proc.stderr
        proc = run_cli("remote", "add", str(fs.mnt), "bad/name", "file:///x", check=False)
        assert proc.returncode == exit_status(errno.EINVAL) and "EINVAL" in proc.stderr
        code, reply = fs.ctl("push origin")
        assert reply.startswith("error EINVAL usage: push <remote>")
