"""`kvlife serve` over loopback: tokens, tenant isolation, limits, malformed requests, torn uploads."""

import hashlib
import socket
from urllib.parse import urlparse

import httpx
import pytest
from tests.store.conftest import TOKENS

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
    for method, path, body in [("GET", f"/v1/chunks/{k}", None), ("PUT", f"/v1/chunks/{k}", seal_chunk(k, b"1")),
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
