"""The one guarded way llavakit reads media bytes: http(s) URLs, base64 data: URLs and local paths.

Every image URL a user or client hands us comes through `fetch_url`, which defends against the
attacks LLaVA servers see (SPEC §7): server-side request forgery (internal addresses, also reached via
redirects or DNS rebinding), other URL schemes, unbounded downloads and slow-drip connections.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, unquote_to_bytes, urljoin, urlsplit

REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
# The well-known NAT64 prefix embeds an IPv4 address in its low 32 bits (RFC 6052).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Printable ASCII goes into a request path as it is ("%" too, so escapes stay); the rest is percent-encoded.
_URL_SAFE = "".join(map(chr, range(0x21, 0x7F)))
_MAX_PATH = 4096  # Linux's PATH_MAX: no file has a longer path, and resolving one costs a system call per part
log = logging.getLogger(__name__)


class MediaError(ValueError):
    """Media could not be read; the message says what is wrong and what to do, for whoever runs llavakit
    (it may name what a host resolved to, or a library's error). `client` says the same to a remote client,
    as servers must: nothing of the server's network, settings or libraries."""

    def __init__(self, message: str, client: str | None = None):
        super().__init__(message)
        self.client = message if client is None else client


@dataclass(slots=True)
class FetchPolicy:
    """Limits for reading media. Servers keep the defaults; tests allow private networks to reach
    127.0.0.1. `allow_local_files=False` makes `read_source` refuse plain paths (servers should set it).

    `local_media_root`: file:// URLs are read only from inside this directory (after resolving symlinks);
    None refuses them. `trusted_hosts`: "host:port" entries exempt from the public-address check (a
    test's local image server, an intranet image store); their address is still resolved once and pinned.
    """

    max_bytes: int = 20 * 2**20
    connect_timeout: float = 5.0
    total_timeout: float = 20.0
    max_redirects: int = 3
    allow_private_networks: bool = False
    user_agent: str = "llavakit"
    allow_local_files: bool = True
    local_media_root: str | None = None
    trusted_hosts: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_bytes <= 0:
            raise ValueError(f"FetchPolicy.max_bytes must be positive, got {self.max_bytes}")
        if self.connect_timeout <= 0 or self.total_timeout <= 0:
            raise ValueError(f"FetchPolicy timeouts must be positive, got connect {self.connect_timeout}, "
                             f"total {self.total_timeout}")
        if self.max_redirects < 0:
            raise ValueError(f"FetchPolicy.max_redirects must be >= 0, got {self.max_redirects}")
        self.trusted_hosts = tuple(self.trusted_hosts)
        for entry in self.trusted_hosts:
            host, sep, port = entry.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"FetchPolicy.trusted_hosts entries are 'host:port', got {entry!r}")

    def trusts(self, host: str, port: int) -> bool:
        """Whether host:port, the host as a URL names it (not what it resolves to), is a trusted host."""
        return f"{host.lower()}:{port}" in {e.lower().replace("[", "").replace("]", "") for e in self.trusted_hosts}


@dataclass(slots=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str


def _short(url: str, limit: int = 100) -> str:
    """A URL fit for an error message (data: URLs and long query strings are cut)."""
    return url if len(url) <= limit else url[:limit] + "..."


def _parse_http_url(url: str) -> _Target:
    """The parts of an http(s) URL to connect to, an IRI sent as browsers send it: the host name in IDNA,
    and non-ASCII characters, spaces and control characters of path and query percent-encoded as UTF-8."""
    try:
        parts = urlsplit(url)
    except ValueError as e:  # an unclosed "[" of an IPv6 host, a host that NFKC turns into a delimiter
        raise MediaError(f"malformed URL {_short(url)!r} ({e}); pass a valid http(s) URL",
                         f"the URL {_short(url)!r} is malformed; send a valid http(s) URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaError(f"URL scheme {scheme or '(none)'!r} is not allowed in {_short(url)!r}; "
                         "only http and https URLs can be fetched")
    if not parts.hostname:
        raise MediaError(f"URL {_short(url)!r} has no host name; pass an absolute http(s) URL")
    try:
        port = parts.port
    except ValueError:  # not a number, or over 65535
        port = 0
    if port == 0:
        raise MediaError(f"the port of {_short(url)!r} is not valid; use a number from 1 to 65535")
    try:
        host = parts.hostname.encode("idna").decode("ascii")
        path = quote(parts.path or "/", safe=_URL_SAFE) + (f"?{quote(parts.query, safe=_URL_SAFE)}" if parts.query
                                                           else "")
    except UnicodeError:  # an empty or over-long label of the host name, a lone surrogate
        raise MediaError(f"the URL {_short(url)!r} has an invalid host name or characters; send a valid http(s) "
                         "URL") from None
    return _Target(scheme, host, port or (443 if scheme == "https" else 80), path)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address tunnels to (mapped, NAT64, 6to4), which is what gets reached."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def is_public_address(address: str) -> bool:
    """True if `address` (an IP literal) is a global unicast address on the public internet."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        ip = _embedded_ipv4(ip) or ip
    # is_global alone lets IPv4 multicast through, so every special range is checked explicitly.
    special = (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
               or ip.is_reserved or ip.is_unspecified)
    return ip.is_global and not special


def check_address(host: str, port: int, policy: FetchPolicy) -> str:
    """Resolve `host` once and return the IP to connect to. Unless the policy allows private networks,
    refuse if ANY resolved address is not public, so a mixed DNS answer cannot sneak one in."""
    # One message for clients whether the name does not resolve or resolves to a private address: telling
    # them apart would let a client map the server's network (which internal names exist, and where).
    private = f"the URL's host {host!r} has no public internet address; use a URL on a public server"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise MediaError(f"could not resolve host {host!r}; check the URL's host name", private) from None
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise MediaError(f"host {host!r} has no addresses; check the URL's host name", private)
    if not (policy.allow_private_networks or policy.trusts(host, port)):
        for address in addresses:
            if not is_public_address(address):
                raise MediaError(f"host {host!r} resolves to {address}, which is not a public internet "
                                 "address; media URLs must point at public servers", private)
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the already-checked IP instead of resolving the host again (DNS rebinding)."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip
        self.pinned_sock: socket.socket | None = None

    def connect(self):
        self.sock = self.pinned_sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the checked IP; the certificate is still verified against the host name."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip
        self.pinned_sock: socket.socket | None = None

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self.pinned_sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _abort(conn: _PinnedHTTPConnection | _PinnedHTTPSConnection) -> None:
    """Watchdog action: unblock any read in progress so the total deadline holds even against a
    server that drips one byte at a time (a per-read socket timeout never fires then). `pinned_sock`,
    not `conn.sock`: http.client drops the latter once a `Connection: close` response is being read."""
    sock = conn.pinned_sock
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed or never connected: nothing to unblock
            sock.shutdown(socket.SHUT_RDWR)


def _check_length(resp: http.client.HTTPResponse, url: str, policy: FetchPolicy) -> int | None:
    announced = resp.getheader("Content-Length")
    if announced is None:
        return None
    try:
        length = int(announced)
    except ValueError:
        raise MediaError(f"{_short(url)!r} sent an invalid Content-Length header") from None
    if length > policy.max_bytes:
        raise MediaError(f"{_short(url)!r} is {length} bytes, over the {policy.max_bytes}-byte limit; "
                         "use a smaller file or raise FetchPolicy.max_bytes",
                         f"{_short(url)!r} is {length} bytes, over the {policy.max_bytes}-byte limit; "
                         "send a smaller file")
    return length


def _read_capped(resp: http.client.HTTPResponse, url: str, policy: FetchPolicy, deadline: float) -> bytes:
    """Read the body in chunks, stopping as soon as it passes the cap or the deadline."""
    chunks, total = [], 0
    while chunk := resp.read1(_CHUNK):
        total += len(chunk)
        if total > policy.max_bytes:
            raise MediaError(f"{_short(url)!r} sent more than the {policy.max_bytes}-byte limit; "
                             "use a smaller file or raise FetchPolicy.max_bytes",
                             f"{_short(url)!r} sent more than the {policy.max_bytes}-byte limit; send a smaller file")
        if time.monotonic() >= deadline:
            raise TimeoutError
        chunks.append(chunk)
    # The watchdog ends a stalled read by shutting the socket, which looks like a normal end of body.
    if time.monotonic() >= deadline:
        raise TimeoutError
    return b"".join(chunks)


def _exchange(conn: http.client.HTTPConnection, target: _Target, url: str, policy: FetchPolicy,
              deadline: float) -> tuple[str | None, bytes]:
    """One GET: (redirect location, b"") for a redirect, else (None, body)."""
    # identity encoding: the byte cap must count what we keep, not a compressed size.
    headers = {"User-Agent": policy.user_agent, "Accept-Encoding": "identity",
               "Accept": "image/*, */*;q=0.5", "Connection": "close"}
    conn.request("GET", target.path, headers=headers)
    with conn.getresponse() as resp:
        return _handle_response(resp, url, policy, deadline)


def _handle_response(resp: http.client.HTTPResponse, url: str, policy: FetchPolicy,
                     deadline: float) -> tuple[str | None, bytes]:
    if resp.status in REDIRECT_STATUSES:
        location = resp.getheader("Location")
        if not location:
            raise MediaError(f"{_short(url)!r} answered {resp.status} without a Location header")
        return urljoin(url, location), b""
    if not 200 <= resp.status < 300:
        advice = "check that the URL points at a file that is publicly readable"
        raise MediaError(f"{_short(url)!r} answered HTTP {resp.status} {resp.reason[:100]}; {advice}",
                         f"{_short(url)!r} answered HTTP {resp.status}; {advice}")
    length = _check_length(resp, url, policy)
    body = _read_capped(resp, url, policy, deadline)
    if length is not None and len(body) != length:
        raise MediaError(f"{_short(url)!r} closed the connection after {len(body)} of {length} bytes; retry")
    return None, body


def _get_once(url: str, policy: FetchPolicy, deadline: float) -> tuple[str | None, bytes]:
    target = _parse_http_url(url)
    ip = check_address(target.host, target.port, policy)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise MediaError(f"fetching {_short(url)!r} took longer than {policy.total_timeout}s")
    cls = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    conn = cls(target.host, target.port, ip, timeout=min(policy.connect_timeout, remaining))
    watchdog = threading.Timer(remaining, _abort, (conn,))
    watchdog.daemon = True
    watchdog.start()
    try:
        return _exchange(conn, target, url, policy, deadline)
    except (OSError, http.client.HTTPException) as e:
        if time.monotonic() >= deadline or isinstance(e, TimeoutError):
            slow = f"fetching {_short(url)!r} took longer than {policy.total_timeout}s (or the connection stalled)"
            raise MediaError(f"{slow}; use a faster host or raise the timeouts", f"{slow}; use a faster host") from None
        raise MediaError(f"could not fetch {_short(url)!r} ({type(e).__name__}); check that the server is reachable",
                         f"could not fetch {_short(url)!r}; check that its server is reachable") from None
    finally:
        watchdog.cancel()
        conn.close()


def fetch_url(url: str, policy: FetchPolicy | None = None) -> bytes:
    """GET an http(s) URL under `policy`: every hop's host is resolved once, checked, and connected to
    by that exact IP; redirects are followed by hand (each re-checked); the body is capped while it
    streams; the whole fetch, redirects included, must finish within `policy.total_timeout`."""
    policy = policy or FetchPolicy()
    deadline = time.monotonic() + policy.total_timeout
    current = url
    for _ in range(policy.max_redirects + 1):
        location, body = _get_once(current, policy, deadline)
        if location is None:
            return body
        current = location
    raise MediaError(f"{_short(url)!r} redirected more than {policy.max_redirects} times; "
                     "pass the final URL or raise FetchPolicy.max_redirects",
                     f"{_short(url)!r} redirected more than {policy.max_redirects} times; send the final URL")


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """Decode `data:[mime][;base64],payload`, checking the decoded size against `max_bytes` before
    decoding so an oversized payload costs no extra memory."""
    header, sep, payload = url.partition(",")
    if not header.lower().startswith("data:") or not sep:
        raise MediaError("malformed data URL: expected 'data:[<mime>][;base64],<data>'")
    if not header.lower().endswith(";base64"):
        data = unquote_to_bytes(payload)
        if len(data) > max_bytes:
            raise MediaError(f"data URL holds {len(data)} bytes, over the {max_bytes}-byte limit")
        return data
    payload = "".join(payload.split())  # clients wrap long base64 lines
    size = len(payload) * 3 // 4 - (len(payload) - len(payload.rstrip("=")))
    if size > max_bytes:
        raise MediaError(f"data URL holds about {size} bytes, over the {max_bytes}-byte limit; "
                         "send a smaller file")
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("data URL payload is not valid base64; encode the file with standard base64") from None


def _read_local(path: str, policy: FetchPolicy) -> bytes:
    if not policy.allow_local_files:
        raise MediaError("local file paths are not accepted here; pass an http(s) or data: URL")
    return _read_file(Path(path).expanduser(), path, policy)


def _read_file_url(url: str, policy: FetchPolicy) -> bytes:
    """A file:// URL, only from inside `policy.local_media_root` (symlinks resolved before the check)."""
    if policy.local_media_root is None:
        instead = "an http(s) URL, a data: URL or a plain file path" if policy.allow_local_files else \
            "an http(s) or data: URL"
        raise MediaError(f"URL scheme 'file' is not supported here (no local media directory is set); pass {instead}")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"file URL {_short(url)!r} names a remote host; only file:///absolute/path is allowed")
    path = unquote(parts.path)
    if "\x00" in path or len(path) > _MAX_PATH:  # a NUL byte stops Path.resolve with a ValueError
        raise MediaError(f"file URL {_short(url)!r} is not a valid file path; pass file:///absolute/path")
    root = Path(policy.local_media_root).resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(root):
        raise MediaError(f"file URL {_short(url)!r} is outside the allowed local media directory; "
                         "only files under that directory can be read")
    return _read_file(target, _short(url), policy)


def _read_file(p: Path, path: str, policy: FetchPolicy) -> bytes:
    if not p.is_file():
        raise MediaError(f"file {path!r} does not exist (or is not a file); check the path")
    size = p.stat().st_size
    if size > policy.max_bytes:
        raise MediaError(f"{path!r} is {size} bytes, over the {policy.max_bytes}-byte limit; "
                         "raise FetchPolicy.max_bytes to read it",
                         f"{path!r} is {size} bytes, over the {policy.max_bytes}-byte limit; send a smaller file")
    return p.read_bytes()


def is_url(source: str) -> bool:
    """Whether `source` is a URL (http(s), data:, file:// or any other scheme://) rather than a file path."""
    if source[:16].lower().startswith(("http://", "https://", "data:", "file://")):
        return True
    scheme, sep, _ = source.partition("://")
    return bool(sep and scheme.isalnum())


def read_source(source: str, policy: FetchPolicy | None = None) -> bytes:
    """Bytes of an http(s) URL, a data: URL, a file:// URL under the policy's local media root, or (if the
    policy allows) a local file path. Every failure is a MediaError: what the checks above did not foresee
    (a file that cannot be read, a library's surprise on odd input) too, logged with its traceback."""
    try:
        return _read_source(source, policy or FetchPolicy())
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - untrusted input must end in a MediaError (a 400 on servers), not a 500
        log.warning("reading media %r failed unexpectedly", _short(source), exc_info=True)
        raise MediaError(f"could not read {_short(source)!r} ({e})",
                         f"{_short(source)!r} could not be read; check the URL") from None


def _read_source(source: str, policy: FetchPolicy) -> bytes:
    lowered = source[:16].lower()
    if lowered.startswith(("http://", "https://")):
        return fetch_url(source, policy)
    if lowered.startswith("data:"):
        return decode_data_url(source, policy.max_bytes)
    if lowered.startswith("file://"):
        return _read_file_url(source, policy)
    if is_url(source):
        scheme = source.partition("://")[0]
        raise MediaError(f"URL scheme {scheme!r} is not supported; use http(s), a data: URL or a file path")
    return _read_local(source, policy)
