"""The monitor's HTTP side: the page, its JSON API, a Server-Sent Events stream, ``/metrics``.

One thread per connection (``ThreadingHTTPServer``, the standard library): the page keeps one
``/api/stream`` open and fetches the rest, so a handful of threads serve a person.

The one request that changes anything is ``POST /api/reset``. The monitor runs as root, so a
reset is made only for a local user the daemon would let change state: the owner of the socket
that asked (``peers.py``), root or in the mount's admin group. Another machine's reset has no
user here and is refused unless ``--remote-resets-as`` names one. A web page elsewhere in the
same browser can send requests to ``127.0.0.1`` too, so a reset must come from the monitor's
own page: the ``Host`` header names the address the monitor listens on, or on a wildcard
address any IP address, ``localhost`` or a name given with ``--host-name`` (a DNS name rebound
to this machine is none of these), the ``Origin``, when the browser sends one, is that same
address, and the body is JSON (a cross-site form cannot send ``application/json`` without a
CORS preflight, which the monitor never grants). ``--read-only`` turns the request off
altogether.

Each connection holds a thread: one that sends nothing, or a stream its client stopped
reading, is closed after ``SOCKET_TIMEOUT_SECONDS``, and past ``CONNECTIONS_MAX`` at once a
new one is closed unanswered, so no one holds the monitor's threads or memory without bound.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import SplitResult, parse_qs, urlsplit

from ..errors import CascowfsError, InvalidArgumentError, PermissionDeniedError
from ..events import printable
from ..privacy import Caller
from .files import FileMissing, MountFiles
from .peers import socket_owner
from .tracker import SERVED_EVENTS, Tracker

log = logging.getLogger("cascowfs.monitor")

_Request = socket.socket | tuple[bytes, socket.socket]  # socketserver's request

DEFAULT_LISTEN = "127.0.0.1:8470"
STREAM_KEEPALIVE_SECONDS = 15.0
MAX_BODY_BYTES = 4096
SOCKET_TIMEOUT_SECONDS = 30.0  # twice the stream's keepalive: a reading page never meets it
CONNECTIONS_MAX = 64  # a page holds one stream and fetches a few things at a time
HOST_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")

# The page's own files, with their types; nothing else under static/ is served.
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/tree.js": ("tree.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/sw.js": ("sw.js", "text/javascript; charset=utf-8"),
    "/manifest.webmanifest": ("manifest.webmanifest", "application/manifest+json"),
    "/icon.svg": ("icon.svg", "image/svg+xml"),
    "/icon-192.png": ("icon-192.png", "image/png"),
    "/icon-512.png": ("icon-512.png", "image/png"),
}

# Every response: data is shown as text by the page, and the policy keeps any script but the
# page's own files from running even if that ever failed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

# The errno of a refused reset, as the HTTP status the page shows it with.
RESET_STATUS = {
    errno.EINVAL: HTTPStatus.BAD_REQUEST,
    errno.ENOENT: HTTPStatus.NOT_FOUND,
    errno.EBUSY: HTTPStatus.CONFLICT,
    errno.EPERM: HTTPStatus.FORBIDDEN,
    errno.EACCES: HTTPStatus.FORBIDDEN,
    errno.ENOTCONN: HTTPStatus.SERVICE_UNAVAILABLE,  # no daemon serves the mount
}


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; the host must be an IP address (no name to resolve)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgumentError(f"--listen {text!r}: expected HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise InvalidArgumentError(f"--listen {text!r}: {host!r} is not an IP address") from None
    return host, int(port)


class MonitorServer(ThreadingHTTPServer):
    daemon_threads = True  # an open event stream does not hold up shutdown

    def __init__(
        self,
        listen: tuple[str, int],
        tracker: Tracker,
        read_only: bool,
        remote_resets_as: Caller | None = None,
        host_names: Iterable[str] = (),
    ) -> None:
        self.address_family = (
            socket.AF_INET6 if ipaddress.ip_address(listen[0]).version == 6 else socket.AF_INET
        )
        super().__init__(listen, MonitorHandler)
        self.tracker = tracker
        self.read_only = read_only
        self.remote_resets_as = remote_resets_as
        self.stopping = threading.Event()
        self.port = int(self.server_address[1])  # the one chosen for port 0
        host = listen[0]
        shown = f"[{host}]" if self.address_family == socket.AF_INET6 else host
        self.url = f"http://{shown}:{self.port}/"
        # On a wildcard address any of the machine's addresses may be asked for; a single
        # address has its own forms. A name is taken only if given (DNS rebinding).
        self.any_address = ipaddress.ip_address(listen[0]).is_unspecified
        self.host_names = frozenset({"localhost", *map(check_host_name, host_names)})
        self.address = None if self.any_address else ipaddress.ip_address(listen[0])
        self._slots = threading.BoundedSemaphore(CONNECTIONS_MAX)
        self._refused_logged = float("-inf")

    def process_request(self, request: _Request, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            now = time.monotonic()
            if now - self._refused_logged >= 60:  # whoever fills the slots fills no log
                self._refused_logged = now
                log.warning("%d connections at once: new ones are closed", CONNECTIONS_MAX)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: _Request, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: object, client_address: tuple) -> None:
        """What escaped a handler (a client gone in the middle of its request line): one line
        of log instead of socketserver's traceback on stderr."""
        exc = sys.exc_info()[1]
        level = logging.DEBUG if isinstance(exc, OSError) else logging.ERROR
        log.log(level, "connection from %s: %r", client_address[0], exc)

    def reset_caller(self, connection: socket.socket) -> Caller:
        """Whose credentials a reset on ``connection`` is sent with: the local user whose
        socket it comes from, or ``remote_resets_as`` for another machine's."""
        uid = socket_owner(connection.getpeername(), connection.getsockname())
        if uid is not None:
            return Caller.of_user(uid)
        if self.remote_resets_as is not None:
            return self.remote_resets_as
        raise PermissionDeniedError(
            "a reset from another machine, whose user is unknown here: refused (the monitor "
            "takes --remote-resets-as USER to send such resets as USER)",
            errno=errno.EPERM,
        )

    def host_allowed(self, host: str | None) -> bool:
        """Whether a ``Host`` header names this monitor: its port, and its address (any
        address, on a wildcard one) or a name it was given."""
        parsed = _host_and_port(host or "")
        if parsed is None or parsed[1] != self.port:
            return False
        name = parsed[0]
        if name in self.host_names:
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        return self.any_address or address == self.address


class MonitorHandler(BaseHTTPRequestHandler):
    server: MonitorServer
    protocol_version = "HTTP/1.1"
    server_version = "cascowfs-monitor"
    _started = False  # whether this request's status line is out

    def setup(self) -> None:
        self.request.settimeout(SOCKET_TIMEOUT_SECONDS)  # each read and write of it
        super().setup()

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- dispatch ------------------------------------------------------------------------------
    # Every request ends in an answer: the routes answer what they can tell apart, and
    # ``_answer`` turns anything else into a 500 and one line of log (a traceback on stderr
    # and a dropped connection tell the page nothing).
    def do_GET(self) -> None:
        self._answer(self._get)

    def do_HEAD(self) -> None:
        self._answer(self._get)  # ``_send`` leaves the body out

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, route: Callable[[], None]) -> None:
        self._started = False
        try:
            route()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away, or stopped reading
        except Exception as exc:
            self.close_connection = True
            log.error("%s %r failed: %r", self.command, self.path, exc)
            log.debug("%s %r failed", self.command, self.path, exc_info=True)
            if self._started:  # a part of the reply is out: only closing is left
                return
            try:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see its log)")
            except OSError:
                pass

    def _get(self) -> None:
        if not self.server.host_allowed(self.headers.get("Host")):
            return self._error(HTTPStatus.MISDIRECTED_REQUEST, "unknown Host header")
        url = _split(self.path)
        if url is None:
            return self._error(HTTPStatus.BAD_REQUEST, "a request target that does not parse")
        query = parse_qs(url.query)
        tracker = self.server.tracker
        if url.path in STATIC:
            return self._static(*STATIC[url.path])
        if url.path == "/metrics":
            return self._metrics()
        if url.path == "/api/state":
            return self._json(self._state())
        if url.path == "/api/tree":
            delta = tracker.tree_since(_int_arg(query, "since", 0))
            return self._json(
                {
                    "seq": delta.seq,
                    "full": delta.full,
                    "nodes": [n.as_json() for n in delta.nodes],
                    "removed": delta.removed,
                }
            )
        if url.path == "/api/branches":
            return self._json([{"name": b.name, "parent": b.parent} for b in tracker.branches()])
        if url.path == "/api/events":
            limit = min(_int_arg(query, "limit", 10), SERVED_EVENTS)
            return self._json([e.as_json() for e in tracker.events(limit)])
        if url.path == "/api/stream":
            return self._stream()
        return self._error(HTTPStatus.NOT_FOUND, f"no such page: {url.path}")

    def _post(self) -> None:
        self.close_connection = True  # a refusal leaves the body unread on the connection
        host = self.headers.get("Host")
        if not self.server.host_allowed(host):
            return self._error(HTTPStatus.MISDIRECTED_REQUEST, "unknown Host header")
        url = _split(self.path)
        if url is None or url.path != "/api/reset":
            return self._error(HTTPStatus.NOT_FOUND, f"no such page: {self.path}")
        origin = self.headers.get("Origin")
        if origin is not None and not _same_origin(origin, host):
            return self._error(HTTPStatus.FORBIDDEN, "cross-origin request refused")
        if self.headers.get_content_type() != "application/json":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        if self.server.read_only:
            return self._error(HTTPStatus.FORBIDDEN, "the monitor runs with --read-only")
        length = _content_length(self.headers.get("Content-Length"))
        if length is None or length > MAX_BODY_BYTES:
            return self._error(HTTPStatus.BAD_REQUEST, "a JSON body of at most 4096 bytes")
        try:
            body = json.loads(self.rfile.read(length))
            branch, ident = body["branch"], body["id"]
            caller = self.server.reset_caller(self.connection)
            result = self.server.tracker.files.reset(branch, ident, caller)
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: deep nesting
            return self._error(HTTPStatus.BAD_REQUEST, 'expected {"branch": ..., "id": ...}')
        except CascowfsError as exc:
            status = RESET_STATUS.get(exc.errno, HTTPStatus.BAD_GATEWAY)
            return self._json(
                {"ok": False, "errno": exc.errno_name, "message": exc.message}, status
            )
        self.server.tracker.poke()
        log.info("reset %s %s as uid %d: %s", branch, ident, caller.uid, result)
        return self._json({"ok": True, "branch": branch, "id": ident, "result": result})

    # -- responses -----------------------------------------------------------------------------
    def _state(self) -> dict:
        return {**self.server.tracker.summary(), "read_only": self.server.read_only}

    def _send(self, status: int, ctype: str, body: bytes, extra: dict | None = None) -> None:
        self._started = True
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: object, status: int = HTTPStatus.OK) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        self._send(status, "application/json", body)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json({"ok": False, "errno": None, "message": message}, status)

    def _static(self, name: str, ctype: str) -> None:
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        extra = {"Service-Worker-Allowed": "/"} if name == "sw.js" else None
        self._send(HTTPStatus.OK, ctype, body, extra)

    def _metrics(self) -> None:
        try:
            body = self.server.tracker.files.metrics()
        except FileMissing as exc:
            return self._send(
                HTTPStatus.SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", _text(str(exc))
            )
        except CascowfsError as exc:
            return self._send(
                HTTPStatus.BAD_GATEWAY, "text/plain; charset=utf-8", _text(exc.message)
            )
        self._send(HTTPStatus.OK, "text/plain; version=0.0.4; charset=utf-8", body)

    def _stream(self) -> None:
        """Server-Sent Events: the state at once, then again on every change."""
        self._started = True
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            return
        tracker = self.server.tracker
        version = -1
        try:
            while not self.server.stopping.is_set():
                seen = tracker.wait_for_change(version, STREAM_KEEPALIVE_SECONDS)
                if seen == version:
                    self.wfile.write(b": keepalive\n\n")
                else:
                    version = seen
                    data = json.dumps(self._state(), separators=(",", ":"))
                    self.wfile.write(f"event: state\ndata: {data}\n\n".encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the page went away, or stopped reading its stream


def _split(url: str) -> SplitResult | None:
    """``url`` split, or None if it does not parse (``http://[::1`` raises ValueError)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def check_host_name(name: str) -> str:
    """A DNS name the page may be reached by (``--host-name``), in lower case."""
    lowered = name.lower()
    if not lowered.isascii() or HOST_NAME_RE.fullmatch(lowered) is None:
        raise InvalidArgumentError(f"--host-name {name!r}: not a DNS name")
    return lowered


def _host_and_port(host: str) -> tuple[str, int] | None:
    """A ``Host`` header's name or address (without brackets, lower case) and port (80 if
    none); None if it does not parse."""
    host = host.lower()
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else "80"
    else:
        name, colon, port = host.rpartition(":")
        if not colon:
            name, port = host, "80"
    if not name or not _digits(port) or len(port) > 5 or int(port) > 65535:
        return None
    return name, int(port)


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether the ``Origin`` header names the address the request came to (``Host``); one
    that does not parse, or names no address (``null``), is another page's."""
    url = _split(origin)
    return url is not None and bool(url.netloc) and url.netloc.lower() == (host or "").lower()


def _digits(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes ``²``, which ``int`` refuses."""
    return text.isascii() and text.isdigit()


def _int_arg(query: dict[str, list[str]], name: str, default: int) -> int:
    values = query.get(name)
    if not values or not _digits(values[0].removeprefix("-")) or len(values[0]) > 18:
        return default
    return int(values[0])


def _content_length(text: str | None) -> int | None:
    if text is None or not _digits(text) or len(text) > 9:
        return None
    return int(text)


def _text(message: str) -> bytes:
    """A line of a text/plain reply; a path's bytes that were not UTF-8 shown as ``\\xNN``."""
    return f"{printable(message)}\n".encode()


def serve(
    mnt: str,
    listen: str = DEFAULT_LISTEN,
    *,
    read_only: bool = False,
    remote_resets_as: str | None = None,
    host_names: Iterable[str] = (),
    as_json: bool = False,
) -> int:
    """Run the monitor of ``mnt`` until SIGTERM or SIGINT; prints the URL once listening (a
    JSON object with ``as_json``). Resets from other machines act as ``remote_resets_as`` (a
    user name or uid), or are refused. ``host_names``: DNS names the page may be reached by,
    beside its addresses and ``localhost``."""
    from ..daemon import sd_notify

    remote_caller = None
    if remote_resets_as is not None:
        user = int(remote_resets_as) if remote_resets_as.isdigit() else remote_resets_as
        try:
            remote_caller = Caller.of_user(user)
        except PermissionDeniedError as exc:
            raise InvalidArgumentError(f"--remote-resets-as: {exc.message}") from None
    files = MountFiles(mnt)
    tracker = Tracker(files)
    server = MonitorServer(parse_listen(listen), tracker, read_only, remote_caller, host_names)

    def stop(signum: int, frame: object) -> None:
        server.stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    tracker.start()
    if as_json:
        record = {"mountpoint": str(files.mnt), "url": server.url, "read_only": read_only}
        print(json.dumps(record), flush=True)
    else:
        print(f"cascowfs monitor of {files.mnt} at {server.url}", flush=True)
    sd_notify(f"READY=1\nSTATUS=serving {files.mnt} at {server.url}")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        tracker.stop()
        server.server_close()
    return 0
