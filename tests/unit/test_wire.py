from __future__ import annotations

import json

from appliance.wire import DONE_EVENT, SSEParser, chat_request, classify, error_body, sse_error_event


def _events(*chunks: bytes) -> list[bytes]:
    p = SSEParser()
    out = [e for c in chunks for e in p.feed(c)]
    return out + list(p.close())


def test_events_split_anywhere_are_reassembled() -> None:
    raw = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
    whole = _events(raw)
    assert whole == [b'{"a":1}', b'{"b":2}', b"[DONE]"]
    for cut in range(1, len(raw)):
        assert _events(raw[:cut], raw[cut:]) == whole
    assert _events(*[bytes([b]) for b in raw]) == whole


def test_crlf_comments_multiline_and_unterminated_tail() -> None:
    raw = b": keep-alive\r\n\r\ndata: line1\r\ndata: line2\r\n\r\nevent: x\ndata:nospace\n\ndata: tail"
    assert _events(raw) == [b"line1\nline2", b"nospace", b"tail"]


def test_classify_vllm_stream_shapes() -> None:
    role = b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
    content = b'{"choices":[{"index":0,"delta":{"content":" molar"},"finish_reason":null}]}'
    last = b'{"choices":[{"index":0,"delta":{"content":""},"finish_reason":"length"}]}'
    usage = b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}'
    error = b'{"error":{"message":"boom","type":"InternalServerError","code":500}}'
    assert classify(role).kind == "role" and classify(role).has_choices
    assert classify(content).content == " molar"
    assert classify(last).kind == "content" and classify(last).finish_reason == "length"
    u = classify(usage)
    assert (
        u.kind == "usage"
        and not u.has_choices
        and u.usage
        == {
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "total_tokens": 7,
        }
    )
    assert classify(error).kind == "error" and classify(error).error == {
        "message": "boom",
        "type": "InternalServerError",
        "code": 500,
    }
    thinking = b'{"choices":[{"index":0,"delta":{"reasoning_content":"Tooth 36?"},"finish_reason":null}]}'
    t = classify(thinking)
    assert (t.kind, t.has_choices, t.content, t.reasoning) == ("content", True, "", "Tooth 36?")
    newer = classify(b'{"choices":[{"index":0,"delta":{"role":"assistant","reasoning":"Hm"}}]}')
    assert (newer.kind, newer.content, newer.reasoning) == ("content", "", "Hm")
    empty = b'{"choices":[{"index":0,"delta":{"content":""},"finish_reason":null}]}'
    assert classify(empty).kind == "content" and classify(empty).content == ""
    assert classify(b"[DONE]").kind == "done"
    assert classify(b"not json").kind == "error"


def test_error_event_is_openai_shaped_and_ends_stream() -> None:
    raw = sse_error_event("vLLM stopped mid-answer", code="upstream_disconnected")
    assert raw.endswith(DONE_EVENT)
    events = _events(raw)
    assert json.loads(events[0]) == error_body(
        "vLLM stopped mid-answer", type_="server_error", code="upstream_disconnected"
    )
    assert classify(events[0]).kind == "error" and classify(events[1]).kind == "done"


def test_chat_request_stream_options() -> None:
    body = chat_request("m", [{"role": "user", "content": "hi"}], max_tokens=3)
    assert body["stream_options"] == {"include_usage": True}
    assert "stream_options" not in chat_request("m", [], max_tokens=1, stream=False)
