"""api.fetch: image URLs may reach public addresses only, however they are spelled,
redirected or resolved. Local HTTP servers stand in for the internal services a
tenant would like to reach; nothing here needs the network."""

import asyncio
import ipaddress
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from api import fetch
from api.fetch import FetchPolicy

BODY = b"\x89PNG fake image bytes"


class _Server:
    """Serves /img, /redirect?to=URL, /big (no Content-Length), /slow; records every hit."""

    def __init__(self, host="127.0.0.1"):
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                if self.path == "/img":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(BODY)))
                    self.end_headers()
                    self.wfile.write(BODY)
                elif self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/big":
                    self.send_response(200)
                    self.end_headers()
                    for _ in range(64):
                        self.wfile.write(b"x" * 1024)
                elif self.path == "/slow":
                    time.sleep(2)
                    self.send_response(200)
                    self.end_headers()
                else:
                    self.send_response(500)
                    self.send_header("Content-Length", "12")
                    self.end_headers()
                    self.wfile.write(b"secret stuff")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def loopback():
    s = _Server("127.0.0.1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def allowed():
    """A server on 127.0.0.2, the one address the policies below open."""
    s = _Server("127.0.0.2")
    yield s
    s.stop()


PUBLIC_ONLY = FetchPolicy(timeout_s=5, max_bytes=4096)
OPENED = FetchPolicy(timeout_s=5, max_bytes=4096, allow_networks=(ipaddress.ip_network("127.0.0.2/32"),))


def download(url, policy=PUBLIC_ONLY):
    return asyncio.run(fetch.download(url, policy))


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0x7f.0.0.1", "017700000001", "localhost",
    "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::127.0.0.1]", "[2002:7f00:1::]", "[64:ff9b::7f00:1]",
    "0.0.0.0", "[::]",
])
def test_loopback_in_any_spelling_is_refused_before_connecting(loopback, host):
    with pytest.raises(fetch.Refused):
        download(f"http://{host}:{loopback.port}/img")
    assert loopback.hits == []


@pytest.mark.parametrize("address", [
    "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "169.254.169.254", "224.0.0.1", "239.255.255.250",
    "240.0.0.1", "255.255.255.255", "198.18.0.1", "192.0.2.1", "0.1.2.3",
    "fe80::1", "fc00::1", "fd12:3456::1", "fec0::1", "ff02::1", "2001:db8::1", "::ffff:10.0.0.1",
    "::ffff:169.254.169.254", "2002:a9fe:a9fe::1", "64:ff9b::a9fe:a9fe",
])
def test_private_link_local_multicast_and_reserved_ranges_are_refused(address):
    assert not PUBLIC_ONLY.address_allowed(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808", "2002:808:808::1"])
def test_public_addresses_are_allowed(address):
    assert PUBLIC_ONLY.address_allowed(address)


def test_an_opened_network_is_fetched_and_its_neighbours_are_not(allowed, loopback):
    assert download(f"{allowed.url}/img", OPENED) == BODY
    with pytest.raises(fetch.Refused):
        download(f"{loopback.url}/img", OPENED)
    assert loopback.hits == []


def test_every_redirect_is_checked_again(allowed, loopback):
    assert download(f"{allowed.url}/redirect?to={allowed.url}/img", OPENED) == BODY
    for target in (f"{loopback.url}/img", f"http://2130706433:{loopback.port}/img", "file:///etc/passwd",
                   "gopher://127.0.0.2/x"):
        with pytest.raises(fetch.Refused):
            download(f"{allowed.url}/redirect?to={target}", OPENED)
    assert loopback.hits == []
    hop = f"{allowed.url}/redirect?to={allowed.url}/img"
    for _ in range(fetch.MAX_REDIRECTS):
        hop = f"{allowed.url}/redirect?to={hop}"
    with pytest.raises(fetch.Refused, match="redirects"):
        download(hop, OPENED)


def test_size_and_time_limits_hold_and_errors_keep_the_remote_answer_out(allowed):
    with pytest.raises(fetch.TooLarge):
        download(f"{allowed.url}/big", OPENED)
    with pytest.raises(TimeoutError):
        download(f"{allowed.url}/slow", FetchPolicy(timeout_s=0.3, max_bytes=4096,
                                                    allow_networks=OPENED.allow_networks))
    with pytest.raises(fetch.Refused) as err:
        download(f"{allowed.url}/error", OPENED)
    assert "500" in str(err.value)  # for the operator's log; api.media shows the client a generic message


def test_the_connection_goes_to_the_address_that_was_checked(allowed, monkeypatch):
    """No DNS rebinding window: the name is resolved once, checked, and that address is
    what the socket connects to."""
    answers = iter([[(2, 1, 6, "", ("127.0.0.2", allowed.port))], [(2, 1, 6, "", ("127.0.0.1", allowed.port))]])
    connected = []

    async def getaddrinfo(self, host, port, **kw):
        return next(answers)

    backend = fetch._CheckedBackend(OPENED)  # noqa: SLF001
    inner = backend.inner.connect_tcp

    async def record(host, port, **kw):
        connected.append(host)
        return await inner(host, port, **kw)

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(backend.inner, "connect_tcp", record)

    async def go():
        stream = await backend.connect_tcp("images.example", allowed.port)
        await stream.aclose()

    asyncio.run(go())
    assert connected == ["127.0.0.2"]


def test_the_host_allowlist_narrows_what_may_be_fetched():
    policy = FetchPolicy(timeout_s=1, max_bytes=1, allow_hosts=("img.example.com", ".cdn.example.org"))
    assert policy.host_allowed("img.example.com") and policy.host_allowed("IMG.example.com.")
    assert policy.host_allowed("a.cdn.example.org")
    assert not policy.host_allowed("example.com") and not policy.host_allowed("evilimg.example.com")
    assert not policy.host_allowed("cdn.example.org.evil.net")
    with pytest.raises(fetch.Refused, match="ALLOW_HOSTS"):
        asyncio.run(fetch.download("http://other.example.net/x.png", policy))
