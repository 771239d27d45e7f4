"""Loading images named in chat messages, under a media policy.

Accepted forms of ``image_url.url``: an absolute local path (``/data/cat.png``), a ``file://``
URL, a ``data:image/...;base64,`` URI, and ``http(s)://`` URLs.

Policy (``--server.allowed_local_media_path``, ``--server.allow_private_media_urls``):
- local paths must resolve (symlinks and ``..`` followed) inside the allowed directory when one
  is set; unset, any readable file is accepted;
- URLs whose host resolves to a private, loopback, link-local or otherwise non-global address
  are refused unless private URLs are allowed; redirects are followed by hand (a few hops) and
  every hop is checked the same way;
- encoded images are capped in bytes, decoded images in pixels (checked on the header, before
  the pixel data is decoded).

Every failure is a :class:`MediaError` whose message names the image and the problem; the
tokenizer process turns it into a 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Optional

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # decoded width * height; processors downscale past ~16M anyway
FETCH_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3


class MediaError(ValueError):
    """An image cannot be used; the message is safe to show to the client."""


@dataclass
class MediaPolicy:
    allowed_local_media_path: Optional[str] = None
    allow_private_media_urls: bool = False
    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    timeout_s: float = FETCH_TIMEOUT_S

    @classmethod
    def from_server_config(cls, server) -> "MediaPolicy":
        return cls(
            allowed_local_media_path=server.allowed_local_media_path,
            allow_private_media_urls=server.allow_private_media_urls,
        )


def _describe(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."


def read_image_bytes(url: str, policy: MediaPolicy) -> bytes:
    """The encoded bytes of the image ``url`` names (no decoding)."""
    if not isinstance(url, str) or not url:
        raise MediaError("image_url.url must be a non-empty string")
    if url.startswith("data:"):
        return _read_data_uri(url, policy)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(f"file URL with a remote host is not supported: {_describe(url)}")
        return _read_local(urllib.parse.unquote(parsed.path), policy)
    if scheme in ("http", "https"):
        return _fetch(url, policy)
    if os.path.isabs(url):
        return _read_local(url, policy)
    raise MediaError(
        f"unsupported image URL {_describe(url)!r}: use an absolute path, file://, data:image/...;base64, or http(s)://"
    )


def _read_data_uri(url: str, policy: MediaPolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError("data URI images must be base64-encoded (data:image/<type>;base64,...)")
    if not header[len("data:"):].startswith("image/"):
        raise MediaError(f"data URI is not an image: {header[:60]!r}")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise MediaError(f"data URI image is larger than {policy.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"data URI image is not valid base64: {e}") from None


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def _read_local(path: str, policy: MediaPolicy) -> bytes:
    if not os.path.isabs(path):
        raise MediaError(f"image path must be absolute: {path!r}")
    real = os.path.realpath(path)
    if policy.allowed_local_media_path:
        root = os.path.realpath(policy.allowed_local_media_path)
        if not _inside(real, root):
            raise MediaError(
                f"image path {path!r} is outside the allowed media directory (--server.allowed_local_media_path)"
            )
    if not os.path.exists(real):
        raise MediaError(f"image file not found: {path!r}")
    if not os.path.isfile(real):
        raise MediaError(f"image path is not a regular file: {path!r}")
    size = os.path.getsize(real)
    if size > policy.max_bytes:
        raise MediaError(f"image file {path!r} has {size} bytes; the limit is {policy.max_bytes}")
    try:
        with open(real, "rb") as f:
            return f.read(policy.max_bytes + 1)
    except OSError as e:
        raise MediaError(f"cannot read image file {path!r}: {e.strerror or e}") from None


def _address_is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def check_url_host(url: str, policy: MediaPolicy) -> None:
    """Refuse URLs whose host resolves to any non-public address (unless allowed)."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname
    if not host:
        raise MediaError(f"image URL has no host: {_describe(url)}")
    if policy.allow_private_media_urls:
        return
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise MediaError(f"cannot resolve image URL host {host!r}: {e}") from None
    for info in infos:
        if not _address_is_public(info[4][0]):
            raise MediaError(
                f"image URL host {host!r} resolves to a private or local address; "
                "fetching it needs --server.allow_private_media_urls"
            )


def _fetch(url: str, policy: MediaPolicy) -> bytes:
    import httpx

    current = url
    with httpx.Client(timeout=policy.timeout_s, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            check_url_host(current, policy)
            try:
                with client.stream("GET", current) as resp:
                    if resp.is_redirect:
                        location = resp.headers.get("location")
                        if not location:
                            raise MediaError(f"image URL redirect without a location: {_describe(current)}")
                        current = urllib.parse.urljoin(current, location)
                        if urllib.parse.urlsplit(current).scheme not in ("http", "https"):
                            raise MediaError(f"image URL redirects to an unsupported scheme: {_describe(current)}")
                        continue
                    if resp.status_code != 200:
                        raise MediaError(f"fetching image {_describe(current)} returned HTTP {resp.status_code}")
                    declared = resp.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                        raise MediaError(f"image at {_describe(current)} is larger than {policy.max_bytes} bytes")
                    body = bytearray()
                    for chunk in resp.iter_bytes():
                        body.extend(chunk)
                        if len(body) > policy.max_bytes:
                            raise MediaError(f"image at {_describe(current)} is larger than {policy.max_bytes} bytes")
                    return bytes(body)
            except httpx.HTTPError as e:
                raise MediaError(f"cannot fetch image {_describe(current)}: {type(e).__name__}: {e}") from None
    raise MediaError(f"image URL redirected more than {MAX_REDIRECTS} times: {_describe(url)}")


def decode_image(data: bytes, policy: MediaPolicy, name: str = "image"):
    """PIL RGB image from encoded bytes; the pixel cap is checked on the header first."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise MediaError(f"{name} is not a readable image: {type(e).__name__}") from None
    width, height = img.size
    if width * height > policy.max_pixels:
        raise MediaError(f"{name} has {width}x{height} pixels; the limit is {policy.max_pixels} pixels")
    if width < 1 or height < 1:
        raise MediaError(f"{name} is empty ({width}x{height})")
    try:
        img.load()
        return img.convert("RGB")
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"{name} cannot be decoded: {type(e).__name__}: {e}") from None


def load_image(url: str, policy: MediaPolicy):
    """Read and decode the image ``url`` names; MediaError on any problem."""
    data = read_image_bytes(url, policy)
    if len(data) > policy.max_bytes:
        raise MediaError(f"image {_describe(url)} is larger than {policy.max_bytes} bytes")
    name = "image" if url.startswith("data:") else f"image {_describe(url)!r}"
    return decode_image(data, policy, name)
