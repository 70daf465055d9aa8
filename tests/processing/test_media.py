"""The guarded fetcher: a local HTTP server on 127.0.0.1 for the happy paths and limits, and refusals
of internal addresses and other schemes that must happen before any connection is attempted."""

import base64
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llavakit.processing import media
from llavakit.processing.media import (
    FetchPolicy,
    MediaError,
    check_address,
    decode_data_url,
    fetch_url,
    is_public_address,
    read_source,
)

BODY = b"\x89PNG fake image bytes" * 10


class Handler(BaseHTTPRequestHandler):
    """Routes: /ok, /redir/N (N hops then /ok), /big (no length), /big-announced, /short,
    /to-private (redirect to 10.0.0.1), /slow and /slow-headers (drip bytes), anything else 404."""

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None):
        self.send_response(status)
        for k, v in (headers or {"Content-Length": str(len(body))}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        p = self.path
        if p in ("/ok", "/caf%C3%A9%20au%20lait.png?q=%C3%BC"):
            self._send(200, BODY)
        elif p.startswith("/redir/"):
            n = int(p.rsplit("/", 1)[1])
            self._send(302, headers={"Location": f"/redir/{n - 1}" if n > 1 else "/ok", "Content-Length": "0"})
        elif p == "/big":
            self._send(200, b"x" * 300_000, headers={"Connection": "close"})
        elif p == "/big-announced":
            self._send(200, headers={"Content-Length": str(10**9)})
        elif p == "/short":
            self._send(200, b"abc", headers={"Content-Length": "10"})
        elif p == "/to-private":
            self._send(307, headers={"Location": "http://10.0.0.1/secret", "Content-Length": "0"})
        elif p == "/slow":
            self.send_response(200)
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        elif p == "/slow-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(40):
                self.wfile.write(b"X-Drip: 1\r\n")
                self.wfile.flush()
                time.sleep(0.05)
        else:
            self._send(404, b"nope")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


LOCAL = FetchPolicy(allow_private_networks=True)


def test_fetch_ok(server):
    assert fetch_url(server + "/ok", LOCAL) == BODY
    assert read_source(server + "/ok", LOCAL) == BODY


def test_redirects_within_and_over_limit(server):
    assert fetch_url(server + "/redir/3", FetchPolicy(allow_private_networks=True, max_redirects=3)) == BODY
    with pytest.raises(MediaError, match="redirected more than 2 times"):
        fetch_url(server + "/redir/3", FetchPolicy(allow_private_networks=True, max_redirects=2))


def test_oversize_body_stops_streaming(server):
    with pytest.raises(MediaError, match="more than the 100000-byte limit"):
        fetch_url(server + "/big", FetchPolicy(allow_private_networks=True, max_bytes=100_000))
    assert len(fetch_url(server + "/big", LOCAL)) == 300_000


def test_announced_length_over_cap_is_refused(server):
    with pytest.raises(MediaError, match="1000000000 bytes, over the"):
        fetch_url(server + "/big-announced", LOCAL)


def test_short_body_is_an_error(server):
    with pytest.raises(MediaError, match="after 3 of 10 bytes"):
        fetch_url(server + "/short", LOCAL)


def test_http_error_names_status(server):
    with pytest.raises(MediaError, match="HTTP 404"):
        fetch_url(server + "/missing", LOCAL)


@pytest.mark.parametrize("path", ["/slow", "/slow-headers"])
def test_total_deadline_holds_against_slow_drip(server, path):
    """Each byte arrives well within the per-read timeout; only the total deadline can stop this."""
    start = time.monotonic()
    with pytest.raises(MediaError, match="longer than 0.5s"):
        fetch_url(server + path, FetchPolicy(allow_private_networks=True, total_timeout=0.5))
    assert time.monotonic() - start < 1.2


@pytest.fixture
def no_connect(monkeypatch):
    """Fail the test on any connection attempt at all."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"connection attempted: {args}")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://localhost/", "http://169.254.169.254/latest/meta-data/", "http://[::1]/",
    "http://2130706433/", "http://0x7f.1/", "http://10.0.0.1/", "http://192.168.1.1:8080/x",
    "http://[::ffff:127.0.0.1]/", "http://[::ffff:10.0.0.1]/", "http://0.0.0.0/", "https://224.0.0.1/",
    "http://100.64.0.1/",
])
def test_internal_addresses_refused_before_connecting(no_connect, url):
    with pytest.raises(MediaError, match="not a public internet address"):
        fetch_url(url)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/", "//host/a"])
def test_other_schemes_refused(no_connect, url):
    with pytest.raises(MediaError, match="scheme"):
        fetch_url(url)


def test_read_source_refuses_other_schemes_and_local_files_when_asked(no_connect, tmp_path):
    with pytest.raises(MediaError, match="scheme 'file'"):
        read_source("file:///etc/passwd")
    (tmp_path / "a.bin").write_bytes(b"abc")
    assert read_source(str(tmp_path / "a.bin")) == b"abc"
    with pytest.raises(MediaError, match="local file paths are not accepted"):
        read_source(str(tmp_path / "a.bin"), FetchPolicy(allow_local_files=False))
    with pytest.raises(MediaError, match="missing.png"):
        read_source(str(tmp_path / "missing.png"))


def test_every_redirect_hop_is_checked(server, monkeypatch):
    """The first hop (the local test server) is allowed; the redirect target is checked under a policy
    forbidding private networks, and must be refused before anything connects to it."""
    calls, real_check = [], media.check_address
    real_connect = socket.create_connection

    def check(host, port, policy):
        calls.append((host, port))
        strict = host != "127.0.0.1"
        return real_check(host, port, FetchPolicy(allow_private_networks=not strict))

    def connect(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"connection attempted to {address}"
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(media, "check_address", check)
    monkeypatch.setattr(socket, "create_connection", connect)
    with pytest.raises(MediaError, match="10.0.0.1"):
        fetch_url(server + "/to-private", LOCAL)
    assert calls == [("127.0.0.1", int(server.rsplit(":", 1)[1])), ("10.0.0.1", 80)]


def test_check_address_and_public_predicate():
    assert check_address("127.0.0.1", 80, LOCAL) == "127.0.0.1"
    with pytest.raises(MediaError, match="127.0.0.1"):
        check_address("127.0.0.1", 80, FetchPolicy())
    for ip in ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]:
        assert is_public_address(ip), ip
    for ip in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254", "100.64.0.1",
               "224.0.0.1", "240.0.0.1", "255.255.255.255", "0.0.0.0", "::", "::1", "fe80::1", "fc00::1",
               "ff02::1", "::ffff:169.254.169.254", "64:ff9b::a00:1", "2002:7f00:1::"]:
        assert not is_public_address(ip), ip


def test_data_urls():
    raw = bytes(range(256)) * 4
    b64 = base64.b64encode(raw).decode()
    assert decode_data_url("data:image/png;base64," + b64, 1024) == raw
    assert decode_data_url("data:image/png;base64," + b64[:100] + "\n" + b64[100:], 1024) == raw
    assert read_source("data:;base64," + b64) == raw
    assert decode_data_url("data:text/plain,a%20b", 10) == b"a b"
    with pytest.raises(MediaError, match="over the 1023-byte limit"):
        decode_data_url("data:image/png;base64," + b64, 1023)
    with pytest.raises(MediaError, match="not valid base64"):
        decode_data_url("data:image/png;base64,@@@@", 1024)
    with pytest.raises(MediaError, match="malformed data URL"):
        decode_data_url("data:image/png;base64", 1024)


def test_data_url_size_checked_before_decoding(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("decoded an oversized payload")
    monkeypatch.setattr(base64, "b64decode", boom)
    with pytest.raises(MediaError, match="limit"):
        decode_data_url("data:image/png;base64," + "A" * 4000, 1000)


def test_policy_validation():
    with pytest.raises(ValueError, match="max_bytes"):
        FetchPolicy(max_bytes=0)
    with pytest.raises(ValueError, match="max_redirects"):
        FetchPolicy(max_redirects=-1)


def test_https_handshake_failure_is_a_media_error(server):
    """The test server speaks plain HTTP, so the TLS handshake of the pinned HTTPS connection fails."""
    with pytest.raises(MediaError, match="could not fetch .*SSL"):
        fetch_url(server.replace("http://", "https://") + "/ok", LOCAL)


def test_file_urls_only_from_inside_the_local_media_root(tmp_path, no_connect):
    root, outside = tmp_path / "media", tmp_path / "secret.bin"
    root.mkdir()
    (root / "a b.png").write_bytes(b"inside")
    outside.write_bytes(b"secret")
    (root / "link.png").symlink_to(outside)
    policy = FetchPolicy(allow_local_files=False, local_media_root=str(root))
    assert read_source(f"file://{root}/a%20b.png", policy) == b"inside"
    for url in (f"file://{outside}", f"file://{root}/../secret.bin", f"file://{root}/link.png"):
        with pytest.raises(MediaError, match="outside the allowed local media directory"):
            read_source(url, policy)
    with pytest.raises(MediaError, match="remote host"):
        read_source(f"file://example.com{root}/a%20b.png", policy)
    with pytest.raises(MediaError, match="scheme 'file' is not supported"):
        read_source(f"file://{root}/a%20b.png", FetchPolicy())
    with pytest.raises(MediaError, match="over the 3-byte limit"):
        read_source(f"file://{root}/a%20b.png", FetchPolicy(max_bytes=3, local_media_root=str(root)))


def test_trusted_hosts_exempt_that_host_and_port_only(server):
    port = int(server.rsplit(":", 1)[1])
    trusted = FetchPolicy(trusted_hosts=(f"127.0.0.1:{port}",))
    assert fetch_url(server + "/ok", trusted) == BODY
    with pytest.raises(MediaError, match="10.0.0.1"):  # its redirects are still checked
        fetch_url(server + "/to-private", trusted)
    with pytest.raises(MediaError, match="not a public internet address"):  # same host, another port
        fetch_url(server + "/ok", FetchPolicy(trusted_hosts=(f"127.0.0.1:{port + 1}",)))
    with pytest.raises(MediaError, match="not a public internet address"):  # another name for the host
        fetch_url(server.replace("127.0.0.1", "localhost") + "/ok", trusted)
    with pytest.raises(ValueError, match="host:port"):
        FetchPolicy(trusted_hosts=("127.0.0.1",))


@pytest.mark.parametrize("source, url", [("http://a/b.png", True), ("HTTPS://a/b.png", True),
                                         ("data:image/png;base64,x", True), ("file:///tmp/a.png", True),
                                         ("ftp://host/a.png", True),
                                         ("images/a.png", False), ("/tmp/a.png", False), ("a:b.png", False),
                                         ("dir/x://y.png", False)])
def test_is_url_tells_urls_from_file_paths(source, url):
    from llavakit.processing.media import is_url

    assert is_url(source) is url


def test_iris_are_fetched_as_browsers_send_them(server, monkeypatch):
    """Non-ASCII (and spaces) in path and query go out percent-encoded as UTF-8, a host name in IDNA."""
    assert fetch_url(server + "/café au lait.png?q=ü", LOCAL) == BODY
    hosts = []

    def check(host, port, policy):
        hosts.append(host)
        raise MediaError("stop here")
    monkeypatch.setattr(media, "check_address", check)
    with pytest.raises(MediaError, match="stop here"):
        fetch_url("http://Bücher.example/a.png")
    assert hosts == ["xn--bcher-kva.example"]


@pytest.mark.parametrize("url, words", [
    ("http://127.0.0.1:99999/a.png", "port"), ("http://127.0.0.1:abc/a.png", "port"),
    ("http://127.0.0.1:0/a.png", "port"), ("http://[::1/a.png", "malformed"),
    ("http://a..b/a.png", "invalid host name"), ("http://example.com/\ud800.png", "invalid host name or characters"),
])
def test_malformed_urls_say_what_is_wrong_without_library_text(no_connect, url, words):
    with pytest.raises(MediaError) as e:
        fetch_url(url)
    assert words in e.value.client
    for library_text in ("out of range", "cast to integer", "Invalid IPv6", "label", "codec", "Error"):
        assert library_text not in e.value.client


def test_client_messages_hide_what_a_host_resolves_to(monkeypatch):
    """A client learns neither the address a name resolves to nor whether it resolves at all (which would map
    the server's network); the message for the operator keeps the address."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "metadata.google.internal":
            return real("169.254.169.254", port, *args, **kwargs)
        if host == "nowhere.internal":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, port, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(MediaError) as resolved:
        check_address("metadata.google.internal", 80, FetchPolicy())
    with pytest.raises(MediaError) as unresolved:
        check_address("nowhere.internal", 80, FetchPolicy())
    assert "169.254.169.254" in str(resolved.value) and "169.254" not in resolved.value.client
    assert resolved.value.client.replace("metadata.google", "nowhere") == unresolved.value.client


@pytest.mark.parametrize("path", ["a%00.png", "a\x00.png", "a/" * 3000 + "b.png"])
def test_file_urls_that_name_no_file_are_media_errors(tmp_path, path):
    """Path.resolve raises ValueError on a NUL byte, and stat OSError on a path over PATH_MAX."""
    with pytest.raises(MediaError, match="not a valid file path"):
        read_source(f"file://{tmp_path}/{path}", FetchPolicy(allow_local_files=False, local_media_root=str(tmp_path)))


def test_unforeseen_failures_are_media_errors(monkeypatch, tmp_path):
    """Whatever fails while reading ends in a MediaError: the message for the operator has the cause, the
    client's does not."""
    def fail(*args):
        raise RuntimeError("secret detail")
    monkeypatch.setattr(media, "decode_data_url", fail)
    with pytest.raises(MediaError) as e:
        read_source("data:image/png;base64,AAAA")
    assert "secret detail" in str(e.value)
    assert "could not be read" in e.value.client
    assert "secret" not in e.value.client and "RuntimeError" not in e.value.client
