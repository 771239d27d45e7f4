"""The real server with a tiny Qwen3-VL, driven by the openai SDK: image inputs and the media
policy (--server.allowed_local_media_path; private URLs refused by default)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from pymllm.testing.tiny_models import tiny_vl_model_dir
from pymllm.tests.server_process import ServerProcess

openai = pytest.importorskip("openai")  # a dev dependency, absent where only `pytest -m gpu` is set up


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("vl-e2e")
    allowed = root / "media"
    allowed.mkdir()
    rng = np.random.default_rng(3)
    for name, (h, w) in {"cat.png": (30, 50), "dog.png": (40, 24)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(allowed / name)
    (allowed / "notes.png").write_text("not an image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "outside.png")
    return root


@pytest.fixture(scope="module")
def server(media):
    srv = ServerProcess(
        ["--server.model_path", str(tiny_vl_model_dir()), "--server.max_total_tokens", "2048",
         "--server.served_model_name", "tiny-vl", "--server.allowed_local_media_path", str(media / "media")],
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def ask(client, *urls, text="What is in the picture?"):
    content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return client.chat.completions.create(
        model="tiny-vl", messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0,
    )


def test_path_file_url_and_base64_agree(client, media):
    path = str(media / "media" / "cat.png")
    by_path = ask(client, path)
    by_file_url = ask(client, "file://" + path)
    encoded = base64.b64encode((media / "media" / "cat.png").read_bytes()).decode()
    by_data = ask(client, "data:image/png;base64," + encoded)
    text_only = client.chat.completions.create(
        model="tiny-vl", messages=[{"role": "user", "content": "What is in the picture?"}], max_tokens=6,
        temperature=0,
    )
    outs = [r.choices[0].message.content for r in (by_path, by_file_url, by_data)]
    assert outs[0] == outs[1] == outs[2]
    # 30x50 pixels -> a 4x6 grid of merged tokens, plus vision start/end markers.
    assert by_path.usage.prompt_tokens == text_only.usage.prompt_tokens + 24 + 2
    assert by_path.usage.completion_tokens == 6


def test_several_images_and_streaming(client, media):
    cat, dog = str(media / "media" / "cat.png"), str(media / "media" / "dog.png")
    both = ask(client, cat, dog)
    assert both.usage.prompt_tokens == ask(client, cat).usage.prompt_tokens + 15 + 2  # 40x24 -> 5x3
    stream = client.chat.completions.create(
        model="tiny-vl", stream=True, max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"},
                                                {"type": "image_url", "image_url": {"url": cat}},
                                                {"type": "image_url", "image_url": {"url": dog}}]}],
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == both.choices[0].message.content


@pytest.mark.parametrize("url,message", [
    ("{media}/missing.png", "not found"),
    ("{media}/notes.png", "not a readable image"),
    ("{root}/outside.png", "outside the allowed media directory"),
    ("{media}/../outside.png", "outside the allowed media directory"),
    ("http://127.0.0.1:9/cat.png", "private or local address"),
    ("http://169.254.169.254/latest/meta-data/", "private or local address"),
    ("data:image/png;base64,AAAA", "not a readable image"),
])
def test_bad_images_are_400(client, media, url, message):
    url = url.format(media=media / "media", root=media)
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, url)
    assert message in str(err.value)


def test_server_survives_bad_images(client, media):
    with pytest.raises(openai.BadRequestError):
        ask(client, str(media / "media" / "missing.png"))
    assert ask(client, str(media / "media" / "dog.png")).usage.completion_tokens == 6
