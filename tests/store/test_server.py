"""`kvlife serve` over loopback: tokens, tenant isolation, limits, malformed requests, torn uploads, contexts,
the shaped link, logs without tokens, no torch."""

import hashlib
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import httpx
import pytest
from tests.store.conftest import TOKENS, _stop, free_port, start_server

from kvlife.cli import main
from kvlife.store.envelope import seal_chunk
from kvlife.store.remote import RemoteBackend


def key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


def test_tenants_never_read_each_other(server_url):
    k = key("shared-context")
    alice, bob = RemoteBackend(server_url, TOKENS["alice"]), RemoteBackend(server_url, TOKENS["bob"])
    alice.put(k, seal_chunk(k, b"alice's cache"))
    assert alice.get(k) == seal_chunk(k, b"alice's cache")
    assert bob.get(k) is None and bob.exists_many([k]) == [False]
    bob.put(k, seal_chunk(k, b"bob's cache"))
    assert alice.get(k) == seal_chunk(k, b"alice's cache")
    assert bob.get(k) == seal_chunk(k, b"bob's cache")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}])
def test_wrong_or_missing_token_is_rejected(server_url, headers):
    k = key("x")
    for method, path, body in [("GET", f"/v1/chunks/{k}", None),
                               ("PUT", f"/v1/chunks/{k}", seal_chunk(k, b"1")),
                               ("POST", "/v1/exists", b'{"keys": []}'), ("GET", "/v1/stats", None)]:
        response = httpx.request(method, server_url + path, content=body, headers=headers)
        assert response.status_code == 401, (method, path)
        assert "token" in response.json()["error"]
    assert httpx.get(server_url + "/v1/health").json() == {"ok": True}


def test_malformed_requests_get_clear_errors(server_url):
    k = key("y")
    cases = [
        ("GET", "/v1/chunks/not-a-key", None, 400, "64 lowercase hex"),
        ("PUT", f"/v1/chunks/{k}", b"not an envelope", 400, "sealed chunk"),
        ("PUT", f"/v1/chunks/{k}", seal_chunk(key("other"), b"payload"), 400, "wrong key"),
        ("PUT", f"/v1/chunks/{k}", seal_chunk(k, b"payload")[:-2], 400, "truncated"),
        ("POST", "/v1/exists", b"{not json", 400, "malformed JSON"),
        ("POST", "/v1/exists", b'{"keys": ["abc"]}', 400, "64 lowercase hex"),
        ("POST", "/v1/exists", b'{"keys": 3}', 400, "keys"),
        ("PUT", f"/v1/chunks/{k}", b"x" * 9_000_000, 413, "limit"),
        ("GET", f"/v1/chunks/{key('absent')}", None, 404, "no such chunk"),
    ]
    for method, path, body, status, words in cases:
        response = httpx.request(method, server_url + path, content=body, headers=auth("alice"))
        assert response.status_code == status, (method, path, response.text)
        assert words in response.json()["error"]
    assert httpx.get(f"{server_url}/v1/chunks/{k}", headers=auth("alice")).status_code == 404


def test_stats(server_url):
    k = key("stats")
    httpx.put(f"{server_url}/v1/chunks/{k}", content=seal_chunk(k, b"z" * 1000), headers=auth("bob"))
    stats = httpx.get(f"{server_url}/v1/stats", headers=auth("bob")).json()
    assert stats["chunks"] >= 1 and stats["bytes"] >= 1000 and stats["max_chunk_bytes"] == 8_000_000


def test_upload_cut_mid_body_stores_nothing(server_url):
    """A client that dies mid-upload (the connection closes early) leaves no entry."""
    k = key("torn")
    blob = seal_chunk(k, bytes(1_000_000))
    url = urlparse(server_url)
    with socket.create_connection((url.hostname, url.port)) as sock:
        head = (f"PUT /v1/chunks/{k} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKENS['alice']}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(blob)}\r\n\r\n")
        sock.sendall(head.encode() + blob[: len(blob) // 2])
    assert httpx.get(f"{server_url}/v1/chunks/{k}", headers=auth("alice")).status_code == 404


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/v1/exists", b"[" * 100_000),
    ("POST", "/v1/exists", b'{"keys": ' + b"[" * 100_000),
    ("PUT", "/v1/contexts/deep", b"[" * 100_000),
    ("POST", "/v1/link", b"{" * 50_000),
])
def test_deeply_nested_json_is_malformed_json_not_a_server_error(server_url, method, path, body):
    response = httpx.request(method, server_url + path, content=body, headers=auth("alice"))
    assert response.status_code == 400, response.text
    assert "malformed JSON" in response.json()["error"]


def test_contexts_are_listed_once_their_chunks_are_stored_and_per_tenant(server_url):
    k1, k2 = key("ctx-1"), key("ctx-2")
    body = {"manifest": {"any": "json the server keeps as it is"}, "chunks": [k1, k2]}
    url = f"{server_url}/v1/contexts/doc.1"
    httpx.put(f"{server_url}/v1/chunks/{k1}", content=seal_chunk(k1, b"one"), headers=auth("alice"))
    response = httpx.put(url, json=body, headers=auth("alice"))
    assert response.status_code == 409
    assert "1 of the context's 2 chunks are not stored" in response.json()["error"]
    httpx.put(f"{server_url}/v1/chunks/{k2}", content=seal_chunk(k2, b"two"), headers=auth("alice"))
    assert httpx.put(url, json=body, headers=auth("alice")).status_code == 201
    assert "doc.1" in httpx.get(f"{server_url}/v1/contexts", headers=auth("alice")).json()["contexts"]
    assert httpx.get(f"{url}/manifest", headers=auth("alice")).json() == body["manifest"]
    assert "doc.1" not in httpx.get(f"{server_url}/v1/contexts", headers=auth("bob")).json()["contexts"]
    assert httpx.get(f"{url}/manifest", headers=auth("bob")).status_code == 404
    assert httpx.put(f"{server_url}/v1/contexts/..x", json=body, headers=auth("alice")).status_code == 400
    other = {"manifest": {}, "chunks": [k2]}  # a second context naming one of the chunks keeps it
    assert httpx.put(f"{server_url}/v1/contexts/doc.2", json=other, headers=auth("alice")).status_code == 201
    assert httpx.delete(url, headers=auth("alice")).json() == {"deleted": "doc.1", "chunks_deleted": 1}
    assert httpx.get(f"{server_url}/v1/chunks/{k1}", headers=auth("alice")).status_code == 404
    assert httpx.get(f"{server_url}/v1/chunks/{k2}", headers=auth("alice")).status_code == 200
    assert httpx.delete(url, headers=auth("alice")).status_code == 404


def test_the_link_is_shaped_by_a_trace_and_needs_a_token(server_url):
    k = key("shaped")
    blob = seal_chunk(k, bytes(100_000))
    httpx.put(f"{server_url}/v1/chunks/{k}", content=blob, headers=auth("bob"))
    assert httpx.post(f"{server_url}/v1/link", json={"trace": "constant:4mbit"}).status_code == 401
    state = httpx.post(f"{server_url}/v1/link", json={"trace": "constant:4mbit"}, headers=auth("bob")).json()
    try:
        assert state["trace"] == "constant:4mbit"
        started = time.perf_counter()
        assert httpx.get(f"{server_url}/v1/chunks/{k}", headers=auth("bob")).content == blob
        assert time.perf_counter() - started >= len(blob) / 500_000 * 0.95  # 4 Mbit/s: 500 KB/s at most
        bad = httpx.post(f"{server_url}/v1/link", json={"trace": "warp:9"}, headers=auth("bob"))
        assert bad.status_code == 400 and "bad trace" in bad.json()["error"]
    finally:
        httpx.post(f"{server_url}/v1/link", json={"trace": None}, headers=auth("bob"))


def test_logs_never_show_a_token(tmp_path):
    """aiohttp logs the header lines of a malformed request in its error: the token in them is redacted."""
    port = free_port()
    server = start_server(tmp_path, port)
    token = TOKENS["alice"]
    malformed = [f"GET /v1/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\x01\r\n\r\n",
                 f"GET /v1/st ats HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\r\n",
                 f"GET /v1/stats HTTP/1.1\r\nX-Note: {token}\x7f\r\n\r\n"]
    try:
        for request in malformed:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(request.encode("latin-1"))
                sock.settimeout(5)
                assert sock.recv(100).startswith(b"HTTP/1.")
    finally:
        _stop(server)
    log = server.stderr.read().decode()
    assert "Error handling request" in log and "[redacted]" in log
    assert token not in log


def test_serve_imports_no_torch(tmp_path):
    """`kvlife serve` needs neither torch nor a model: it listens without importing them."""
    code = f"""
import sys
import kvlife.store.server as server
loaded = lambda: sorted(m for m in ("torch", "transformers") if m in sys.modules)
server.web.run_app = lambda *args, **kwargs: print(loaded())
from kvlife.cli import main
main(["serve", "--store", {str(tmp_path)!r}, "--token", "t"])
main(["stream", "serve", "--root", {str(tmp_path)!r}])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("[]") == 2, done.stdout


@pytest.mark.parametrize("argv,message", [
    (["serve", "--store", "{tmp}", "--token", ""], "--token is empty"),
    (["serve", "--store", "{tmp}", "--tenant", "a= "], "bad tenant"),
    (["serve", "--store", "{tmp}", "--token", "t", "--trace", "constant:-3mbit"], "must be > 0"),
    (["serve", "--store", "{tmp}", "--token", "t", "--piece-bytes", "100"], "--piece-bytes must be at least"),
    (["stream", "serve", "--root", "{tmp}", "--token", " "], "--token is empty"),
])
def test_serve_refuses_bad_options_in_one_line(argv, message, tmp_path, capsys):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("kvlife: error:"), err
