"""Remote names and URLs, kept in the store as ``STORE/remotes.json`` (mode 0600).

A remote is ``file:///path`` (a directory, e.g. on NFS) or ``s3://BUCKET[/PREFIX]`` with an
optional endpoint URL (MinIO, Ceph RGW, Garage, R2, a test server); S3 credentials and the
region come the standard AWS way (environment, ``~/.aws/config``, profiles), never from here.
Wherever a remote name is asked for, a URL is taken as it is.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import ExistsError, InvalidArgumentError, NotFoundError

CONFIG_FILE = "remotes.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class RemoteSpec:
    name: str  # the configured name, or the URL itself for a remote given by URL
    url: str
    endpoint_url: str | None = None

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    def describe(self) -> str:
        """How messages name the remote."""
        return self.url if self.name == self.url else f"{self.name} ({self.url})"


def check_remote_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"invalid remote name {name!r}: 1-64 of letters, digits, '.', '_', '-', "
            "not starting with '.', '_' or '-'"
        )
    return name


def check_url(url: str, endpoint_url: str | None = None) -> str:
    """``url`` if it names a remote this version can reach, else EINVAL saying why. No
    control character, NUL included, raw or percent-encoded in a directory's path: URL
    parsing drops a TAB or a newline without a word (``a<TAB>b`` would be ``ab``), and a
    path holds no NUL."""
    if _has_control(url):
        raise InvalidArgumentError(f"remote URL {url!r} contains a control character")
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidArgumentError(f"remote URL {url!r}: give file:///absolute/path")
        if _has_control(unquote(parts.path)):
            raise InvalidArgumentError(
                f"remote URL {url!r}: its path contains a control character (NUL, TAB, ...)"
            )
    elif parts.scheme == "s3":
        if not _BUCKET.fullmatch(parts.netloc):
            raise InvalidArgumentError(f"remote URL {url!r}: {parts.netloc!r} is no bucket name")
        if parts.query or parts.fragment:
            raise InvalidArgumentError(f"remote URL {url!r}: no query or fragment allowed")
    else:
        raise InvalidArgumentError(f"remote URL {url!r}: the scheme must be file:// or s3://")
    if endpoint_url is not None:
        if parts.scheme != "s3":
            raise InvalidArgumentError("--endpoint-url is for s3:// remotes only")
        if urlsplit(endpoint_url).scheme not in ("http", "https"):
            raise InvalidArgumentError(f"endpoint URL {endpoint_url!r} must be http(s)://")
    return url


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _path(store: Path) -> Path:
    return store / CONFIG_FILE


def load(store: Path) -> dict[str, RemoteSpec]:
    try:
        raw = json.loads(_path(store).read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise InvalidArgumentError(f"{_path(store)} does not parse: {exc}") from None
    return {
        name: RemoteSpec(name, d["url"], d.get("endpoint_url")) for name, d in sorted(raw.items())
    }


def _save(store: Path, remotes: dict[str, RemoteSpec]) -> None:
    data = {
        r.name: {"url": r.url, **({"endpoint_url": r.endpoint_url} if r.endpoint_url else {})}
        for r in remotes.values()
    }
    tmp = _path(store).with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, _path(store))


def add(store: Path, name: str, url: str, endpoint_url: str | None = None) -> RemoteSpec:
    name = check_remote_name(name)
    spec = RemoteSpec(name, check_url(url, endpoint_url), endpoint_url)
    remotes = load(store)
    if name in remotes:
        raise ExistsError(f"remote {name!r} already exists ({remotes[name].url})")
    remotes[name] = spec
    _save(store, remotes)
    return spec


def remove(store: Path, name: str) -> None:
    remotes = load(store)
    if check_remote_name(name) not in remotes:
        raise NotFoundError(f"no remote {name!r}")
    del remotes[name]
    _save(store, remotes)


def resolve(store: Path, name_or_url: str) -> RemoteSpec:
    """The remote a name of ``store``'s configuration stands for, or one given by URL."""
    if "://" in name_or_url:
        return RemoteSpec(name_or_url, check_url(name_or_url))
    spec = load(store).get(check_remote_name(name_or_url))
    if spec is None:
        raise NotFoundError(f"no remote {name_or_url!r} (see cascowfs remote ls)")
    check_url(spec.url, spec.endpoint_url)  # as an older version may have taken it
    return spec
