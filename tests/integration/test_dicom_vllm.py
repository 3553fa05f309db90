"""A DICOM radiograph sent with the openai SDK through the real gateway to the real vLLM (CPU build, demo VLM): the
model answers, it saw exactly the PNG the gateway renders, and no header value reached the audit log or the
gateway's log."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from pydicom import uid

from appliance.gateway.dicom import convert_dicom
from tests.conftest import RunningGateway, RunningVllm
from tests.integration.conftest import sdk_client as client
from tests.unit.gateway.dicomgen import MARKERS, data_url, dicom_file, private_marker, radiograph

pytestmark = pytest.mark.vllm

QUESTION = "Describe the radiograph."


def ask(gw: RunningGateway, vllm: RunningVllm, url: str) -> Any:
    return client(gw).chat.completions.create(
        model=vllm.model,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},  # random weights may pick EOS early; the comparison needs all 8 tokens
    )  # fmt: skip


def test_a_dicom_sent_with_the_sdk_is_answered_as_its_png(
    gateway_server: RunningGateway, vllm_server: RunningVllm
) -> None:
    audited = len(gateway_server.audit_records())
    data = dicom_file(radiograph(384, 512, 12), uid.JPEGLSLossless, photometric="MONOCHROME1",
                      extra={"WindowCenter": 2000, "WindowWidth": 3000})  # fmt: skip
    from_dicom = ask(gateway_server, vllm_server, data_url(data))
    assert from_dicom.choices[0].message.content
    assert from_dicom.usage is not None and from_dicom.usage.completion_tokens == 8
    rec = gateway_server.wait_audit(audited + 1)[-1]
    assert rec["status"] == 200 and rec["images"] == 1
    assert isinstance(rec["dicom"], list) and rec["dicom"][0].startswith("dicom, 512×384, 12 bit, JPEG-LS, ")

    # The same request with the PNG the gateway renders, sent directly: vLLM saw the same image (same prompt
    # length) and, greedy, writes the same answer.
    png = convert_dicom(base64.b64encode(data), 10**8).png_base64.decode()
    from_png = ask(gateway_server, vllm_server, "data:image/png;base64," + png)
    assert from_png.usage is not None and from_png.usage.prompt_tokens == from_dicom.usage.prompt_tokens
    assert from_png.choices[0].message.content == from_dicom.choices[0].message.content

    produced = gateway_server.audit_log.read_text() + gateway_server.log_path.read_text(errors="replace")
    for marker in [*MARKERS.values(), private_marker()]:
        assert marker not in produced, f"{marker!r} reached the gateway's audit log or log"


def test_a_cbct_volume_is_refused_by_the_gateway_not_vllm(
    gateway_server: RunningGateway, vllm_server: RunningVllm
) -> None:
    import numpy as np
    import openai

    volume = np.concatenate([radiograph(64, 64, 12, seed=i) for i in range(4)])
    data = dicom_file(volume, extra={"NumberOfFrames": 4, "Rows": 64})
    with pytest.raises(openai.BadRequestError) as info:
        ask(gateway_server, vllm_server, data_url(data))
    assert info.value.code == "unsupported_dicom" and "4 frames" in info.value.message
