"""Image loading under the media policy, placeholder expansion, cache keys, and the flags."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading

import numpy as np
import pytest

from pymllm.configs import ConfigError, parse_config
from pymllm.engine.io_struct import GenerateReqInput
from pymllm.multimodal.inputs import MultimodalInputs, cache_key, expand_image_placeholders
from pymllm.multimodal.media import MediaError, MediaPolicy, check_url_host, load_image
from pymllm.multimodal.processor import image_urls_of
from pymllm.orchestrator.tokenizer_process import InvalidRequest, RequestTokenizer


def png_bytes(h: int = 12, w: int = 20) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 200, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def media_dir(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(png_bytes())
    (allowed / "text.png").write_bytes(b"this is not an image")
    (tmp_path / "secret.png").write_bytes(png_bytes())
    os.symlink(tmp_path / "secret.png", allowed / "link.png")
    return tmp_path


def test_local_path_file_url_and_data_uri(media_dir):
    policy = MediaPolicy()
    path = str(media_dir / "allowed" / "ok.png")
    assert load_image(path, policy).size == (20, 12)
    assert load_image("file://" + path, policy).size == (20, 12)
    data = "data:image/png;base64," + base64.b64encode(png_bytes(5, 6)).decode()
    assert load_image(data, policy).size == (6, 5)
    assert load_image(data, policy).mode == "RGB"


@pytest.mark.parametrize("url,message", [
    ("/nonexistent/cat.png", "not found"),
    ("relative/cat.png", "unsupported image URL"),
    ("ftp://example.com/cat.png", "unsupported image URL"),
    ("data:image/png;base64,!!!", "not valid base64"),
    ("data:text/plain;base64,aGk=", "not an image"),
    ("data:image/png,rawbytes", "base64"),
    ("file://remote-host/cat.png", "remote host"),
])
def test_bad_urls(url, message):
    with pytest.raises(MediaError, match=message):
        load_image(url, MediaPolicy())


def test_not_an_image_and_directory(media_dir):
    with pytest.raises(MediaError, match="not a readable image"):
        load_image(str(media_dir / "allowed" / "text.png"), MediaPolicy())
    with pytest.raises(MediaError, match="not a regular file"):
        load_image(str(media_dir), MediaPolicy())


def test_allowed_local_media_path_confines_paths(media_dir):
    policy = MediaPolicy(allowed_local_media_path=str(media_dir / "allowed"))
    assert load_image(str(media_dir / "allowed" / "ok.png"), policy).size == (20, 12)
    for outside in (str(media_dir / "secret.png"),
                    str(media_dir / "allowed" / ".." / "secret.png"),
                    str(media_dir / "allowed" / "link.png"),  # symlink pointing outside
                    "file://" + str(media_dir / "secret.png")):
        with pytest.raises(MediaError, match="outside the allowed media directory"):
            load_image(outside, policy)
    # A sibling directory sharing the name prefix is outside too.
    sibling = media_dir / "allowed2"
    sibling.mkdir()
    (sibling / "x.png").write_bytes(png_bytes())
    with pytest.raises(MediaError, match="outside"):
        load_image(str(sibling / "x.png"), policy)


def test_size_and_pixel_caps(media_dir):
    path = str(media_dir / "allowed" / "ok.png")
    with pytest.raises(MediaError, match="limit is 10"):
        load_image(path, MediaPolicy(max_bytes=10))
    with pytest.raises(MediaError, match="20x12 pixels"):
        load_image(path, MediaPolicy(max_pixels=100))


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.png", "http://localhost:8080/x.png", "http://10.1.2.3/x.png", "http://192.168.0.1/x.png",
    "http://169.254.169.254/latest/meta-data", "http://[::1]/x.png", "http://0.0.0.0/x.png",
    "https://[::ffff:127.0.0.1]/x.png",
])
def test_private_urls_refused(url):
    with pytest.raises(MediaError, match="allow_private_media_urls"):
        load_image(url, MediaPolicy())
    check_url_host(url, MediaPolicy(allow_private_media_urls=True))  # allowed when asked for


@pytest.fixture
def http_server():
    body = png_bytes(9, 11)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.end_headers()
                return
            if self.path != "/img.png":
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_http_fetch(http_server):
    policy = MediaPolicy(allow_private_media_urls=True)
    assert load_image(http_server + "/img.png", policy).size == (11, 9)
    assert load_image(http_server + "/redirect", policy).size == (11, 9)
    with pytest.raises(MediaError, match="HTTP 404"):
        load_image(http_server + "/missing.png", policy)
    with pytest.raises(MediaError, match="larger than 10 bytes"):
        load_image(http_server + "/img.png", MediaPolicy(allow_private_media_urls=True, max_bytes=10))
    with pytest.raises(MediaError, match="private"):
        load_image(http_server + "/img.png", MediaPolicy())


def test_image_urls_of_messages():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "a"},
            {"type": "image_url", "image_url": {"url": "/a.png"}},
            {"type": "image_url", "image_url": {"url": "/b.png", "detail": "low"}},
        ]},
        {"role": "user", "content": [{"type": "image", "image": "/c.png"}]},
    ]
    assert image_urls_of(messages) == ["/a.png", "/b.png", "/c.png"]
    with pytest.raises(MediaError):
        image_urls_of([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_expand_placeholders_and_cache_key():
    pad = 99
    assert expand_image_placeholders([1, pad, 2, pad], pad, [3, 1]) == [1, pad, pad, pad, 2, pad]
    with pytest.raises(ValueError, match="2 image placeholder"):
        expand_image_placeholders([1, pad, pad], pad, [3])
    ids = [1, pad, pad, 2, pad, 3]

    def mm(hashes):
        return MultimodalInputs(
            pixel_values=np.zeros((0, 1), np.float32), image_grid_thw=np.array([[1, 2, 4], [1, 2, 2]]),
            image_hashes=hashes, image_token_id=pad, mrope_positions=np.zeros((3, len(ids)), np.int64),
            mrope_position_delta=0,
        )

    a, b = cache_key(ids, mm([5, 6])), cache_key(ids, mm([5, 7]))
    assert a == [1, -6, -6, 2, -7, 3] and b[:4] == a[:4] and b[4] != a[4]
    assert cache_key(ids + [pad], mm([5, 6]))[-1] == pad  # generated tokens stay token ids
    assert cache_key(ids, None) == ids


def test_media_flags_parse_and_validate(tmp_path):
    cfg = parse_config(["--server.allowed_local_media_path", str(tmp_path), "--server.allow_private_media_urls"])
    assert cfg.server.allowed_local_media_path == str(tmp_path)
    assert cfg.server.allow_private_media_urls is True
    policy = MediaPolicy.from_server_config(cfg.server)
    assert policy.allowed_local_media_path == str(tmp_path) and policy.allow_private_media_urls
    default = parse_config([])
    assert default.server.allowed_local_media_path is None and default.server.allow_private_media_urls is False
    with pytest.raises(ConfigError, match="allowed_local_media_path"):
        parse_config(["--server.allowed_local_media_path", str(tmp_path / "missing")])


def test_text_model_rejects_images():
    class Tok:
        chat_template = "x"

    worker = RequestTokenizer(Tok(), 512, {})
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/a.png"}}]}]
    with pytest.raises(InvalidRequest, match="does not accept images"):
        worker.tokenize(GenerateReqInput(rid="r", messages=msg))
