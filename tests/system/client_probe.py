"""A workstation's calls, run by the system tests inside the rehearsal container's network namespace.

Usage: python client_probe.py CA_CERT API_KEY MODEL  — prints one JSON document with what happened.
It talks only to https://127.0.0.1:8443 (the container's loopback) and names a remote image on 127.0.0.2,
which the gateway must refuse without fetching it. It also sends DICOM files (uncompressed, and JPEG-LS, which GDCM
decodes in the gateway's worker processes), so the conversion is proven under the installed unit's hardening.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import sys
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (64, 64), color=128).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _dicom(transfer_syntax: str) -> str:
    from pydicom import uid

    from tests.unit.gateway import dicomgen

    syntax = getattr(uid, transfer_syntax)
    pixels = dicomgen.radiograph(128, 160, bits=12)
    frame = None if syntax == uid.ExplicitVRLittleEndian else dicomgen.compress(pixels, 12, syntax)
    return dicomgen.data_url(dicomgen.dicom_file(pixels, syntax, frame=frame))


def main() -> None:
    ca, key, model = sys.argv[1:4]
    port = sys.argv[4] if len(sys.argv) > 4 else "8443"
    out: dict[str, object] = {}
    # "The outside": a listener on 127.0.0.2 inside the container's namespace; the gateway must never connect to it.
    outside = socket.socket()
    outside.bind(("127.0.0.2", 0))
    outside.listen(8)
    outside.setblocking(False)
    remote_url = f"http://127.0.0.2:{outside.getsockname()[1]}/radiograph.png"
    with httpx.Client(verify=ca, timeout=120) as http:
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key=key, http_client=http, max_retries=0)
        reply = client.chat.completions.create(
            model=model,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe this radiograph."},
                        {"type": "image_url", "image_url": {"url": _png()}},
                    ],
                }
            ],
            max_tokens=8,
        )
        out["inline_image"] = {
            "choices": len(reply.choices),
            "prompt_tokens": reply.usage.prompt_tokens if reply.usage else None,
        }
        try:
            client.chat.completions.create(
                model=model,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Describe this radiograph."},
                            {"type": "image_url", "image_url": {"url": remote_url}},
                        ],
                    }
                ],
                max_tokens=8,
            )
            out["remote_image"] = {"status": 200}
        except openai.APIStatusError as err:
            out["remote_image"] = {"status": err.status_code}
        for syntax in ("ExplicitVRLittleEndian", "JPEGLSLossless"):
            try:
                dicom_reply = client.chat.completions.create(
                    model=model,
                    messages=[
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "Describe this radiograph."},
                                {"type": "image_url", "image_url": {"url": _dicom(syntax)}},
                            ],
                        }
                    ],
                    max_tokens=4,
                )
                out[f"dicom_{syntax}"] = {"choices": len(dicom_reply.choices)}
            except openai.APIStatusError as err:
                out[f"dicom_{syntax}"] = {"status": err.status_code, "body": str(err.body)[:300]}
        try:
            outside.accept()
            out["outside_contacted"] = True
        except BlockingIOError:
            out["outside_contacted"] = False
        bad = openai.OpenAI(
            base_url=f"https://127.0.0.1:{port}/v1", api_key="ce_wrong", http_client=http, max_retries=0
        )
        try:
            bad.models.list()
            out["wrong_key"] = {"status": 200}
        except openai.APIStatusError as err:
            out["wrong_key"] = {"status": err.status_code}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
