"""The object stores remotes live in, behind one small interface: a directory
(``file://``) and S3 (``s3://``, through boto3).

Keys are ``/``-separated paths relative to the remote's root (its directory, or its bucket
and prefix). Every key but a snapshot ref names immutable content, so ``put`` may overwrite
(the bytes are the same); a ref is written with ``put_new``, which fails with EEXIST when
the key exists already, atomically: ``link(2)`` of a finished file on a directory, a
conditional put (``If-None-Match: *``) on S3. Errors name the remote and the key.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from ..errors import CascowfsError, ExistsError, NotFoundError, StoreIOError, from_os_error
from .config import RemoteSpec


@dataclass(frozen=True)
class Listed:
    key: str
    size: int
    modified: float  # seconds since the epoch


class ObjectStore(Protocol):
    spec: RemoteSpec

    def get(self, key: str) -> bytes: ...

    def put(self, key: str, data: bytes) -> None: ...

    def put_new(self, key: str, data: bytes) -> None: ...

    def list(self, prefix: str) -> list[Listed]: ...

    def delete(self, key: str) -> None: ...


def open_store(spec: RemoteSpec) -> ObjectStore:
    if spec.scheme == "file":
        return FileStore(spec)
    return S3Store(spec)


class FileStore:
    """A remote in a directory. Files are written under ``tmp/`` and renamed (or, for
    ``put_new``, linked) into place, so a reader never sees a partial file."""

    def __init__(self, spec: RemoteSpec) -> None:
        self.spec = spec
        self.root = Path(unquote(urlsplit(spec.url).path))

    def _where(self, key: str) -> Path:
        return self.root / key

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise NotFoundError(f"remote {self.spec.describe()}: no object {key}") from None
        except OSError as exc:
            raise from_os_error(exc, f"remote {self.spec.describe()}, object {key}") from exc

    def get(self, key: str) -> bytes:
        with self._errors(key):
            return self._where(key).read_bytes()

    def _staged(self, data: bytes) -> Path:
        tmp = self.root / "tmp" / secrets.token_hex(8)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def put(self, key: str, data: bytes) -> None:
        with self._errors(key):
            target = self._where(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self._staged(data), target)
            _fsync_dir(target.parent)

    def put_new(self, key: str, data: bytes) -> None:
        with self._errors(key):
            target = self._where(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._staged(data)
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise ExistsError(f"remote {self.spec.describe()}: {key} exists already") from None
            finally:
                os.unlink(tmp)
            _fsync_dir(target.parent)

    def list(self, prefix: str) -> list[Listed]:
        top = self._where(prefix)
        out = []
        with self._errors(prefix):
            if not top.is_dir():
                return []
            for dirpath, _, files in os.walk(top):
                for name in files:
                    path = Path(dirpath) / name
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue  # deleted meanwhile
                    out.append(Listed(str(path.relative_to(self.root)), st.st_size, st.st_mtime))
        return sorted(out, key=lambda entry: entry.key)

    def delete(self, key: str) -> None:
        with self._errors(key):
            try:
                os.unlink(self._where(key))
            except FileNotFoundError:
                pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# S3 error codes that mean "a conditional put lost": the key exists (412), or another
# conditional put of it is in flight (409)
_LOST_RACE = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


class S3Store:
    """A remote in an S3 bucket, under an optional key prefix."""

    def __init__(self, spec: RemoteSpec) -> None:
        import boto3
        from botocore.config import Config

        self.spec = spec
        parts = urlsplit(spec.url)
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=spec.endpoint_url,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            where = f"remote {self.spec.describe()}"
            if code in _MISSING:
                raise NotFoundError(f"{where}: no object {key}") from None
            if code in _LOST_RACE:
                raise ExistsError(f"{where}: {key} exists already") from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise CascowfsError(f"{where}, object {key}: {exc}", errno=errno.EACCES) from None
            raise StoreIOError(f"{where}, object {key}: {exc}") from None
        except BotoCoreError as exc:  # no credentials, no connection, ...
            raise StoreIOError(f"remote {self.spec.describe()}, object {key}: {exc}") from None

    def get(self, key: str) -> bytes:
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_new(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"
            )

    def list(self, prefix: str) -> list[Listed]:
        out = []
        strip = len(self._key(""))
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            )
            for page in pages:
                for item in page.get("Contents", []):
                    out.append(
                        Listed(item["Key"][strip:], item["Size"], item["LastModified"].timestamp())
                    )
        return out

    def delete(self, key: str) -> None:
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
