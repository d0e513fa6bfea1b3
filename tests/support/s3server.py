"""An S3-compatible server on 127.0.0.1 for the remote tests: moto's server (moto[server],
a test dependency), one process per test session, a fresh bucket per test. Skipped, with
the reason, where moto is not installed."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from typing import Iterator

import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "cascowfs-test",
    "AWS_SECRET_ACCESS_KEY": "cascowfs-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """The endpoint URL of a running moto server; it is stopped on exit."""
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"no S3 server: moto[server] is not installed ({exc})")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"moto server did not start (exit {proc.poll()})")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=30)


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"cascowfs-{secrets.token_hex(6)}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def set_credentials() -> None:
    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)
