"""Fetching a URL that a request names (image parts of chat messages) without letting
a tenant reach what only the API can reach (SSRF).

* http and https only, to public addresses: the host is resolved and every address
  it resolves to must be global unicast (no loopback, private, shared, link-local,
  site-local, multicast, reserved or unspecified range, IPv4 or IPv6; IPv4 embedded
  in IPv6 (mapped, compatible, 6to4, NAT64) is judged as IPv4). IP literals in any
  spelling the resolver accepts (decimal ``2130706433``, octal ``0177.0.0.1``, hex,
  short forms) are judged by the address they resolve to.
* The connection goes to the address that was checked (the check sits in the
  connection's network backend), so DNS cannot answer differently between the
  check and the connect; TLS still verifies the certificate against the host name.
* Redirects are followed by hand, at most :data:`MAX_REDIRECTS`, and every hop is
  checked again the same way; proxies from the environment are not used.
* ``INFERSTACK_FETCH_ALLOW_HOSTS`` narrows the hosts further;
  ``INFERSTACK_FETCH_ALLOW_NETWORKS`` opens named ranges (an internal image store).
* Time and size limits hold for the whole fetch, and errors never echo what the
  remote side answered.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
_REDIRECTS = {301, 302, 303, 307, 308}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_COMPATIBLE = ipaddress.ip_network("::/96")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(Exception):
    """Why a fetch was refused; logged for the operator, never shown to the client."""


class TooLarge(Exception):
    pass


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    timeout_s: float
    max_bytes: int
    allow_hosts: tuple[str, ...] = ()
    """Empty: any host. ``img.example.com`` that host, ``.example.com`` its subdomains."""
    allow_networks: tuple[IPNetwork, ...] = ()
    """Ranges allowed besides public addresses."""

    @classmethod
    def of(cls, settings) -> "FetchPolicy":
        return cls(settings.fetch_timeout_s, settings.fetch_max_bytes,
                   tuple(h.strip().lower().rstrip(".") for h in settings.fetch_allow_hosts.split(",") if h.strip()),
                   tuple(ipaddress.ip_network(n.strip(), strict=False)
                         for n in settings.fetch_allow_networks.split(",") if n.strip()))

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return not self.allow_hosts or any(
            host.endswith(h) if h.startswith(".") else host == h for h in self.allow_hosts)

    def address_allowed(self, address: str | IPAddress) -> bool:
        ip = ipaddress.ip_address(address)
        if any(ip in net for net in self.allow_networks if net.version == ip.version):
            return True
        if ip.version == 6:
            embedded = ip.ipv4_mapped or ip.sixtofour
            if embedded is None and (ip in _NAT64 or ip in _COMPATIBLE):
                embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            if embedded is not None:
                return self.address_allowed(embedded)
            if ip.is_site_local:
                return False
        return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_private or ip.is_loopback
                                     or ip.is_link_local or ip.is_unspecified)


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Resolves the host, refuses it unless every address is allowed, and connects to
    the address it checked."""

    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        host = host.strip("[]")  # an IPv6 literal's brackets
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        refused = [a for a in addresses if not self.policy.address_allowed(a)]
        if not addresses or refused:
            raise Refused(f"{host} resolves to {refused or 'nothing'}")
        return await self.inner.connect_tcp(addresses[0], port, timeout=timeout, local_address=local_address,
                                            socket_options=socket_options)

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise Refused("unix sockets are never fetched")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def _check_url(url: str, policy: FetchPolicy) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused(f"not an http(s) URL: {url[:200]!r}")
    if not policy.host_allowed(parts.hostname):
        raise Refused(f"host {parts.hostname!r} is not in INFERSTACK_FETCH_ALLOW_HOSTS")
    return url


async def download(url: str, policy: FetchPolicy) -> bytes:
    """The body behind ``url`` (a 200 answer), or :class:`Refused` / :class:`TooLarge`
    / ``TimeoutError``."""
    async with asyncio.timeout(policy.timeout_s):
        async with httpcore.AsyncConnectionPool(ssl_context=httpx.create_ssl_context(), retries=0,
                                                network_backend=_CheckedBackend(policy)) as pool:
            for _ in range(MAX_REDIRECTS + 1):
                try:
                    async with pool.stream("GET", _check_url(url, policy),
                                           headers=[(b"Accept", b"image/*"), (b"User-Agent", b"inferstack")]) as r:
                        headers = {k.lower(): v for k, v in r.headers}
                        if r.status in _REDIRECTS and b"location" in headers:
                            url = urljoin(url, headers[b"location"].decode("latin-1"))
                            continue
                        if r.status != 200:
                            raise Refused(f"answered HTTP {r.status}")
                        if int(headers.get(b"content-length", b"0") or 0) > policy.max_bytes:
                            raise TooLarge
                        chunks, size = [], 0
                        async for chunk in r.aiter_stream():
                            size += len(chunk)
                            if size > policy.max_bytes:
                                raise TooLarge
                            chunks.append(chunk)
                        return b"".join(chunks)
                except (httpcore.UnsupportedProtocol, httpcore.NetworkError, httpcore.ProtocolError,
                        httpcore.TimeoutException, OSError, ValueError, UnicodeError) as exc:
                    raise Refused(f"{type(exc).__name__}: {exc}") from None
            raise Refused(f"more than {MAX_REDIRECTS} redirects")
