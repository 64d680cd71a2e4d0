"""Downloading reference audio from a client-supplied URL without becoming an SSRF proxy.

The original server fetched any ``http(s)`` URL it was given, so anyone who could reach it could make it request
internal addresses (cloud metadata endpoints, admin interfaces on localhost). Here:

* only ``http`` and ``https`` URLs are accepted;
* the host name is resolved first and **every** resolved address is checked: loopback, private, link-local,
  multicast, reserved, unspecified and other non-global ranges are refused (IPv4 embedded in IPv6, as in
  ``::ffff:127.0.0.1``, 6to4, Teredo or NAT64 ``64:ff9b::/96``, is unwrapped first) unless ``allow_private`` is set;
  numeric host forms (``2130706433``, ``0x7f.1``, ``127.1``) resolve to the address they denote and are checked
  as that address;
* the connection goes to the very address that was checked (the URL's host is replaced by the IP, the original
  name is kept in the ``Host`` header and as TLS SNI / certificate name), so a DNS answer that changes between
  the check and the connect (DNS rebinding) cannot redirect the request;
* redirects are followed by hand, at most :data:`MAX_REDIRECTS`, and each hop is checked the same way;
* connect and read timeouts apply, plus an overall deadline; the body is read in pieces and abandoned as soon
  as it exceeds ``max_bytes`` (a declared ``Content-Length`` above the cap is refused before reading);
* environment proxies are ignored (``trust_env=False``): a proxy would make the address check meaningless.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

import anyio
import httpx

from flashtts_core.errors import InvalidRequestError, PayloadTooLargeError

__all__ = ("MAX_REDIRECTS", "UrlFetchError", "UrlNotAllowedError", "fetch_url", "is_public_address", "looks_like_url")

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlNotAllowedError(InvalidRequestError):
    """The URL's scheme or (resolved) address is not allowed."""

    default_code = "url_not_allowed"


class UrlFetchError(InvalidRequestError):
    """The URL could not be downloaded (network error, timeout, non-200 answer)."""

    default_code = "url_fetch_failed"


def looks_like_url(value: str) -> bool:
    """Whether a reference string is meant as a URL (any ``scheme://``), not base64.

    Any scheme counts, so that ``file:///etc/passwd`` is refused as a URL with a clear message instead of
    failing as "invalid base64"."""
    head = value[:32].lower()
    scheme, sep, _ = head.partition("://")
    return bool(sep) and scheme.isascii() and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum()


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: "global", yet it reaches IPv4 hosts


def _unwrap(ip: _IPAddress) -> _IPAddress:
    """The IPv4 address carried inside an IPv6 one (mapped, 6to4, Teredo, NAT64), else ``ip``."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def is_public_address(ip: _IPAddress) -> bool:
    """True for globally routable unicast addresses only."""
    ip = _unwrap(ip)
    return not (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


async def _resolve(host: str, port: int, *, allow_private: bool, param: str) -> str:
    """Resolve ``host`` and return the address to connect to, after checking all of them."""
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise UrlFetchError(f"the host of the {param} URL could not be resolved ({host!r})", param=param) from exc
    addresses: list[_IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        text = str(sockaddr[0]).split("%", 1)[0]  # drop an IPv6 zone id
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError:
            continue
    if not addresses:
        raise UrlFetchError(f"the host of the {param} URL has no usable address ({host!r})", param=param)
    if not allow_private:
        for ip in addresses:
            if not is_public_address(ip):
                logger.warning("refused a reference URL resolving to a non-public address (%s)", ip)
                raise UrlNotAllowedError(
                    f"the {param} URL points to a private, loopback or otherwise non-public address; "
                    "use a public URL, upload the file, or start the server with --allow_private_urls",
                    param=param,
                )
    return str(addresses[0])


def _check_url(url: str, *, param: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise UrlFetchError(f"the {param} URL is not a valid URL", param=param) from exc
    if parsed.scheme not in ("http", "https"):
        raise UrlNotAllowedError(
            f"the {param} URL uses the scheme {parsed.scheme!r}; only http and https URLs are accepted "
            "(upload local files as a file or base64 instead)",
            param=param,
        )
    if not parsed.host:
        raise UrlFetchError(f"the {param} URL has no host", param=param)
    return parsed


async def fetch_url(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    allow_private: bool = False,
    param: str = "reference_audio",
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes:
    """Download ``url`` (see the module docstring for the rules) and return its body.

    Raises :class:`UrlNotAllowedError` (400) for refused schemes/addresses, :class:`UrlFetchError` (400) for
    network errors, timeouts and non-200 answers, and :class:`PayloadTooLargeError` (413) over ``max_bytes``.
    """
    client_timeout = httpx.Timeout(timeout_s, connect=timeout_s, read=timeout_s)
    async with httpx.AsyncClient(
        timeout=client_timeout, follow_redirects=False, trust_env=False, transport=transport
    ) as client:
        try:
            with anyio.fail_after(timeout_s * 3):
                return await _fetch(client, url, max_bytes=max_bytes, allow_private=allow_private, param=param)
        except TimeoutError as exc:
            raise UrlFetchError(f"downloading the {param} URL took too long", param=param) from exc


async def _fetch(client: httpx.AsyncClient, url: str, *, max_bytes: int, allow_private: bool, param: str) -> bytes:
    current = _check_url(url, param=param)
    for _hop in range(MAX_REDIRECTS + 1):
        port = current.port or (443 if current.scheme == "https" else 80)
        address = await _resolve(current.host, port, allow_private=allow_private, param=param)
        target = current.copy_with(host=address)
        host_header = current.host if current.port is None else f"{current.host}:{current.port}"
        if ":" in current.host and current.port is None:  # an IPv6 literal keeps its brackets
            host_header = f"[{current.host}]"
        extensions = {"sni_hostname": current.host} if current.scheme == "https" else {}
        try:
            async with client.stream(
                "GET",
                target,
                headers={"Host": host_header, "Accept": "audio/*, application/octet-stream;q=0.9, */*;q=0.5"},
                extensions=extensions,
            ) as response:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise UrlFetchError(f"the {param} URL redirected without a Location", param=param)
                    current = _check_url(str(current.join(location)), param=param)
                    continue
                if response.status_code != 200:
                    raise UrlFetchError(
                        f"the {param} URL answered HTTP {response.status_code}; it must return the audio file",
                        param=param,
                    )
                return await _read_capped(response, max_bytes=max_bytes, param=param)
        except httpx.HTTPError as exc:
            raise UrlFetchError(f"the {param} URL could not be downloaded ({type(exc).__name__})", param=param) from exc
    raise UrlFetchError(f"the {param} URL redirected more than {MAX_REDIRECTS} times", param=param)


async def _read_capped(response: httpx.Response, *, max_bytes: int, param: str) -> bytes:
    declared = response.headers.get("content-length")
    too_large = f"the {param} URL's file is larger than the limit of {max_bytes / 1_000_000:.1f} MB"
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(too_large, param=param)
    body = bytearray()
    async for piece in response.aiter_bytes():
        body.extend(piece)
        if len(body) > max_bytes:
            raise PayloadTooLargeError(too_large, param=param)
    return bytes(body)
