"""The object stores remotes live in, behind one small interface: a directory
(``file://``) and S3 (``s3://``, through boto3).

Keys are ``/``-separated paths relative to the remote's root (its directory, or its bucket
and prefix). Every key but a snapshot ref names immutable content, so ``put`` may overwrite
(the bytes are the same); a ref is written with ``put_new``, which fails with EEXIST when
the key exists already, atomically: ``link(2)`` of a finished file on a directory, a
conditional put (``If-None-Match: *``) on S3. Errors name the remote and the key.

A remote may be written by others, so a reader says how large an object it reads may be
(``get``'s ``max_bytes``: the ``*_BYTES_MAX`` bounds below, or a pack's size as its index
records it): an object over that is EIO naming it before its bytes are read, not a
multi-gigabyte file read into a root daemon's memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from ..errors import (
    CascowfsError,
    ExistsError,
    InvalidArgumentError,
    NotFoundError,
    StoreIOError,
    from_os_error,
)
from .config import RemoteSpec
from .packs import INDEX_BODY_MAX, INDEX_MAGIC, PACK_BODY_MAX, PACK_MAGIC


def frame_bytes_max(body_bytes: int) -> int:
    """The most bytes a zstd frame of ``body_bytes`` bytes takes (zstd's
    ``ZSTD_COMPRESSBOUND``: incompressible data stored raw, plus block and frame headers)."""
    small = (128 << 10) - body_bytes
    return body_bytes + (body_bytes >> 8) + (small >> 11 if small > 0 else 0)


# The largest object of each kind a reader takes (``get``'s ``max_bytes``): more than this
# version writes, with room to spare where the writer's bound is loose. A ref is JSON of at
# most 128 labels of 32 KiB in all, which JSON escapes to at most six times that (a lone
# surrogate as ``\udcXX``), and ids and counts of a few hundred bytes: under 200 KiB.
REF_BYTES_MAX = 1 << 20
# A lock is JSON of a host name (at most 64 bytes), a pid and a time: under 1 KiB.
LOCK_BYTES_MAX = 64 << 10
# An index, and a pack (whose index also records its exact size), are a magic and one zstd
# frame of a bounded body.
INDEX_BYTES_MAX = len(INDEX_MAGIC) + frame_bytes_max(INDEX_BODY_MAX)
PACK_BYTES_MAX = len(PACK_MAGIC) + frame_bytes_max(PACK_BODY_MAX)


@dataclass(frozen=True)
class Listed:
    key: str
    size: int
    modified: float  # seconds since the epoch


class ObjectStore(Protocol):
    spec: RemoteSpec

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """The bytes of object ``key``; EIO naming it, before they are read, if it holds more
        than ``max_bytes`` (None: no bound)."""
        ...

    def put(self, key: str, data: bytes) -> None: ...

    def put_new(self, key: str, data: bytes) -> None: ...

    def create(self) -> None: ...

    def list(self, prefix: str) -> list[Listed]: ...

    def delete(self, key: str) -> None: ...


def open_store(spec: RemoteSpec) -> ObjectStore:
    if spec.scheme == "file":
        return FileStore(spec)
    return S3Store(spec)


class FileStore:
    """A remote in a directory. Files are written under ``tmp/`` and renamed (or, for
    ``put_new``, linked) into place, so a reader never sees a partial file; a write that
    fails removes its partial file.

    Others may write the directory (a team's share on NFS), and so put a symbolic link where
    a directory or a file of the remote belongs, to make a root process write or delete
    elsewhere. So nothing below the remote's root is followed, with no window between a
    check and a use: each operation opens the root (the configured path, as given), then the
    one directory of its key relative to that descriptor with ``O_NOFOLLOW | O_DIRECTORY``,
    and names the file relative to the directory's descriptor (``openat`` with
    ``O_NOFOLLOW``, ``renameat``, ``linkat``, ``unlinkat``, which act on the name itself). A
    link where a directory or file belongs is EIO naming it; a listing shows the regular
    files directly in the directory, nothing else.

    Files are 0600 and directories 0700 whatever the umask: a remote holds every pushed
    file's bytes without the modes that guard them, as the store does. The root is made only
    by ``create`` (a push): reading a directory that is not there is ENOENT naming it.
    """

    def __init__(self, spec: RemoteSpec) -> None:
        self.spec = spec
        self.root = Path(unquote(urlsplit(spec.url).path))

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        where = f"remote {self.spec.describe()}"
        try:
            yield
        except FileNotFoundError:
            raise NotFoundError(f"{where}: no object {key}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreIOError(
                    f"{where}: {key} is a symbolic link, which a directory remote never follows"
                ) from None
            raise from_os_error(exc, f"{where}, object {key}") from exc

    def create(self) -> None:
        with self._errors(""):
            os.makedirs(self.root, mode=_DIR_MODE, exist_ok=True)

    @contextmanager
    def _dir(self, top: str, *, create: bool) -> Iterator[int]:
        """A descriptor of the remote's directory ``top`` (made if ``create``): opened below
        the root's descriptor, never through a symbolic link. FileNotFoundError if it is not
        there; NotFoundError naming the root if that is not."""
        where = f"remote {self.spec.describe()}"
        try:
            root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"{where}: no directory {self.root}") from None
        except OSError as exc:
            raise from_os_error(exc, f"{where}: directory {self.root}") from exc
        try:
            try:
                fd = os.open(top, _DIR_FLAGS, dir_fd=root)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(top, _DIR_MODE, dir_fd=root)
                fd = os.open(top, _DIR_FLAGS, dir_fd=root)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            try:  # to say what is there (O_NOFOLLOW | O_DIRECTORY answers ENOTDIR for both)
                link = stat.S_ISLNK(os.lstat(top, dir_fd=root).st_mode)
            except OSError:
                link = False
            what = (
                "a symbolic link, which a directory remote never follows"
                if link
                else ("no directory")
            )
            raise StoreIOError(f"{where}: {top}/ is {what}") from None
        finally:
            os.close(root)
        try:
            yield fd
        finally:
            os.close(fd)

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        top, name = _split(key)
        with self._errors(key), self._dir(top, create=False) as where:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=where)
            with open(fd, "rb") as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise StoreIOError(f"remote {self.spec.describe()}: {key} is no regular file")
                if max_bytes is None:
                    return f.read()
                if st.st_size > max_bytes:
                    raise _too_large(self.spec, key, st.st_size, max_bytes)
                # to one byte past the size told (a read of n bytes allocates n), and on
                # to one past the bound if a writer of the directory made the file grow
                data = f.read(st.st_size + 1)
                if len(data) > st.st_size:
                    data += f.read(max_bytes + 1 - len(data))
                if len(data) > max_bytes:
                    raise _too_large(self.spec, key, None, max_bytes)
                return data

    def put(self, key: str, data: bytes) -> None:
        top, name = _split(key)
        with self._errors(key), self._dir("tmp", create=True) as tmp:
            with self._dir(top, create=True) as where:
                staged = _stage(tmp, data)
                try:
                    os.rename(staged, name, src_dir_fd=tmp, dst_dir_fd=where)
                except BaseException:
                    _unlink_quietly(staged, tmp)
                    raise
                os.fsync(where)

    def put_new(self, key: str, data: bytes) -> None:
        top, name = _split(key)
        with self._errors(key), self._dir("tmp", create=True) as tmp:
            with self._dir(top, create=True) as where:
                staged = _stage(tmp, data)
                try:
                    os.link(staged, name, src_dir_fd=tmp, dst_dir_fd=where, follow_symlinks=False)
                except FileExistsError:
                    raise ExistsError(
                        f"remote {self.spec.describe()}: {key} exists already"
                    ) from None
                finally:
                    _unlink_quietly(staged, tmp)
                os.fsync(where)

    def _list(self, top: str) -> list[Listed]:
        out = []
        with self._dir(top, create=False) as where:
            for entry in os.scandir(where):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted meanwhile
                if stat.S_ISREG(st.st_mode):
                    out.append(Listed(f"{top}/{entry.name}", st.st_size, st.st_mtime))
        return sorted(out, key=lambda entry: entry.key)

    def list(self, prefix: str) -> list[Listed]:
        top = prefix.removesuffix("/")
        if top not in TOPS:
            raise InvalidArgumentError(f"{prefix!r} is no directory of a remote")
        with self._errors(prefix):
            try:
                return self._list(top)
            except FileNotFoundError:  # not made yet
                return []

    def delete(self, key: str) -> None:
        top, name = _split(key)
        with self._errors(key), contextlib.suppress(FileNotFoundError):
            with self._dir(top, create=False) as where:
                os.unlink(name, dir_fd=where)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_MODE = 0o700
_FILE_MODE = 0o600
# the directories of a remote (docs/remotes.md, "The format"); a key is one of them and a name
TOPS = ("snapshots", "packs", "index", "locks", "tmp")


def _split(key: str) -> tuple[str, str]:
    """``key``'s directory and name; EINVAL for a key in no directory of a remote's, or
    whose name is no file name."""
    top, _, name = key.partition("/")
    if top not in TOPS or not name or "/" in name or name in (".", "..") or "\0" in name:
        raise InvalidArgumentError(f"{key!r} is no key of a remote")
    return top, name


def _stage(tmp: int, data: bytes) -> str:
    """A new file in the directory ``tmp`` holding ``data``, synced; its name. Nothing is
    left behind if it cannot be written whole (a full disk)."""
    name = secrets.token_hex(8)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, _FILE_MODE, dir_fd=tmp)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(name, tmp)
        raise
    os.close(fd)
    return name


def _unlink_quietly(name: str, where: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=where)


class TooLargeError(StoreIOError):
    """An object larger than the bound its reader takes (EIO): not read."""


def _too_large(spec: RemoteSpec, key: str, size: int | None, max_bytes: int) -> StoreIOError:
    """EIO for object ``key`` of ``size`` bytes (None: more than it may, of a size not
    told), over the ``max_bytes`` its reader takes."""
    holds = f"{size} bytes" if size is not None else "more bytes"
    return TooLargeError(
        f"remote {spec.describe()}: {key} holds {holds}, more than the {max_bytes} it may hold"
    )


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

    def create(self) -> None:
        """Nothing: a bucket is made by its owner, and a prefix needs no making."""

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        with self._errors(key):
            reply = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            body = reply["Body"]
            if max_bytes is None:
                return body.read()
            with contextlib.closing(body):  # unread: the connection is dropped, not drained
                size = reply.get("ContentLength")
                if size is not None and size > max_bytes:
                    raise _too_large(self.spec, key, size, max_bytes)
                if size is not None:  # read whole: botocore checks the body against it
                    return body.read()
                # an untold length: read to one byte past the bound at most (``read(n)``
                # gives at most n bytes, not always n)
                parts: list[bytes] = []
                got = 0
                while got <= max_bytes:
                    part = body.read(max_bytes + 1 - got)
                    if not part:
                        return b"".join(parts)
                    parts.append(part)
                    got += len(part)
                raise _too_large(self.spec, key, None, max_bytes)

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
