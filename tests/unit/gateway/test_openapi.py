"""docs/openapi.yaml and docs/workstation.md describe the gateway that exists: its two routes and every error code
it can return (read from the source, so a new code without documentation fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from appliance.gateway.app import CHAT_PATH, MODELS_PATH

ROOT = Path(__file__).resolve().parents[3]
_CODE_PATTERNS = [
    r'_bad\(\s*"(\w+)"',
    r'(?:Refusal|RejectedError|_refuse)\(\s*\d+,\s*"(\w+)"',
    r'_answer_error\(\s*s,\s*\d+,\s*"(\w+)"',
    r'return None, "(\w+)", f?"',
    r'\(\d{3}, "(\w+)"\)',
    r'return "(\w+)"',
    r'"(\w+_dicom)",?\s*\)',  # DicomError(message, code)
]


def _codes_in_source() -> set[str]:
    sources = [p for p in (ROOT / "appliance" / "gateway").glob("*.py") if p.name != "images.py"]  # formats, not codes
    text = "".join(p.read_text() for p in sources)
    codes = {code for pattern in _CODE_PATTERNS for code in re.findall(pattern, text)}
    return codes


def test_openapi_lists_the_two_routes_and_every_error_code() -> None:
    doc = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
    assert set(doc["paths"]) == {CHAT_PATH, MODELS_PATH}
    documented = set(doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"])
    in_source = _codes_in_source()
    assert len(in_source) > 25, in_source  # the patterns still find the codes
    assert in_source <= documented, f"codes missing from docs/openapi.yaml: {sorted(in_source - documented)}"


def test_workstation_guide_explains_every_error_code() -> None:
    doc = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
    codes = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    guide = (ROOT / "docs" / "workstation.md").read_text()
    missing = [c for c in codes if f"`{c}`" not in guide]
    assert not missing, f"codes not explained in docs/workstation.md: {missing}"
