"""The demo model served by a real vLLM, called with the openai SDK as a dental workstation would."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

from tests.conftest import RunningVllm

pytestmark = pytest.mark.vllm


def _client(vllm: RunningVllm) -> openai.OpenAI:
    return openai.OpenAI(base_url=vllm.base_url + "/v1", api_key="unused", timeout=60, max_retries=0)


def _png_data_url(size: int) -> str:
    img = Image.new("L", (size, size))
    img.putdata([(x * 7 + y * 3) % 256 for y in range(size) for x in range(size)])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_streamed_chat_has_role_chunk_content_usage(vllm_server: RunningVllm) -> None:
    stream = _client(vllm_server).chat.completions.create(
        model=vllm_server.model,
        messages=[{"role": "user", "content": "Describe the lower left molar."}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},  # random weights may pick EOS early (CI once stopped at 2 tokens)
    )
    chunks = list(stream)
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant"
    assert not first.choices[0].delta.content
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content, "no content chunks"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 6
    assert usage_chunk.usage.prompt_tokens > 0


def test_inline_png_counts_as_image_tokens(vllm_server: RunningVllm) -> None:
    client = _client(vllm_server)
    question = {"type": "text", "text": "What do you see?"}
    text_only = client.chat.completions.create(
        model=vllm_server.model, messages=[{"role": "user", "content": [question]}], max_tokens=1
    )
    with_image = client.chat.completions.create(
        model=vllm_server.model,
        messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_data_url(512)}}, question]}
        ],
        max_tokens=1,
    )
    assert text_only.usage is not None and with_image.usage is not None
    # 512x512 -> resized to 448, 2x2 tiles of 224 + 1 global tile, 64 tokens each = 320 <image> tokens.
    extra = with_image.usage.prompt_tokens - text_only.usage.prompt_tokens
    assert 320 <= extra <= 340, extra


def test_stream_ends_with_done_on_the_wire(vllm_server: RunningVllm) -> None:
    """The raw bytes end with data: [DONE] (the SDK hides it), parsed by our shared wire module."""
    import json
    import urllib.request

    from appliance.wire import SSEParser, chat_request, classify

    body = chat_request(vllm_server.model, [{"role": "user", "content": "Hello"}], max_tokens=3, ignore_eos=True)
    req = urllib.request.Request(
        vllm_server.base_url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    parser = SSEParser()
    kinds = []
    with urllib.request.urlopen(req, timeout=60) as resp:
        for chunk in iter(lambda: resp.read1(4096), b""):
            kinds += [classify(data).kind for data in parser.feed(chunk)]
    assert kinds[0] == "role"
    assert kinds[-2:] == ["usage", "done"]
    assert kinds.count("content") == 3
