"""The chat page over plain HTTP: its files are served at / and /web/, need no API key while the API and the
page's settings still do, ask for nothing outside the server, stay under the body guards, and `--no-web` turns
them off. (tests/serve/test_web_browser.py drives the page in a real browser.)"""

from __future__ import annotations

import re
import socket

import httpx

from llavakit.serve.web import ASSETS

from .harness import API_KEY, AUTH, ServeProcess, read_reply, start_server

PAGE_FILES = {"/": "text/html", "/web/app.js": "text/javascript", "/web/style.css": "text/css"}


def test_the_page_and_its_assets_are_served_without_the_key(server):
    for path, media_type in PAGE_FILES.items():
        r = httpx.get(server.url + path)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["content-type"].startswith(media_type)
        assert "connect-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
    html = httpx.get(server.url + "/").text
    assert '<script src="/web/app.js"' in html and 'href="/web/style.css"' in html
    assert set(PAGE_FILES) == set(ASSETS)


def test_the_page_needs_nothing_from_elsewhere(server):
    """No URL with a host in any file (no CDN, no web fonts); the page's requests are all same-origin paths."""
    total = 0
    for path in PAGE_FILES:
        text = httpx.get(server.url + path).text
        total += len(text.encode())
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), path
        assert "@import" not in text and "@font-face" not in text
    assert total < 40_000  # small: the whole page in one round of three requests
    js = httpx.get(server.url + "/web/app.js").text
    assert set(re.findall(r'api\("([^"]+)"', js)) == {"/web/settings", "/v1/chat/completions"}


def test_the_api_and_the_settings_still_need_the_key(server):
    for path in ("/web/settings", "/v1/models", "/web/__init__.py", "/web/", "/index.html"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 401
    r = httpx.get(server.url + "/web/settings", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_settings_tell_the_page_the_model_and_the_limits(server):
    r = httpx.get(server.url + "/web/settings", headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {"model": "tiny", "max_model_len": 256, "max_images_per_request": 4,
                        "max_body_bytes": 2**20, "max_image_bytes": 256 * 1024, "max_image_pixels": 16_000_000,
                        "boxes_on_padded_square": True}


def test_only_the_page_files_are_served(pipe):
    """Without a key the page paths are the whole of what the web package serves: not its Python, not a folder."""
    with start_server(pipe) as srv:
        for path in ("/web/__init__.py", "/web/", "/web/index.html", "/web/../app.js", "/index.html", "/web"):
            assert httpx.get(srv.url + path).status_code == 404, path
        assert httpx.get(srv.url + "/web/settings").json()["model"] == "llavakit"


def test_the_body_guards_still_apply_to_the_page_paths(server):
    """Exempt from the key, not from the limits: an oversized body to / is cut off with 413."""
    r = httpx.post(server.url + "/", content=b"x" * (2**20 + 1))
    assert r.status_code == 413
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\nConnection: close\r\n\r\n")
        status, _, body = read_reply(sock)
    assert status == 413 and b"request_too_large" in body


def test_llavakit_serve_no_web(checkpoint):
    """`--no-web`: the API alone (test_web_browser.py runs `llavakit serve` with the page)."""
    with ServeProcess(checkpoint, "--api-key", API_KEY, "--no-web") as srv:
        for path in (*PAGE_FILES, "/web/settings"):
            assert httpx.get(srv.url + path, headers=AUTH).status_code == 404, path
        assert httpx.get(srv.url + "/v1/models", headers=AUTH).status_code == 200
        assert httpx.get(srv.url + "/v1/models").status_code == 401
