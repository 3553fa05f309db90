"""Reading ``plan.json`` back: the planner's ``--json`` document as the installer left it, typed.

``clinic-edge plan --write-env DIR`` writes ``DIR/plan.json`` (:func:`appliance.planner.render.plan_document`). The
vLLM start gate, the status reader and the self-test read it back, here: :func:`read_plan_document` says what is
wrong with a file that is missing, not JSON or not an object, and :class:`PlanFile` is the part of the document
they use, each field ``None`` (or empty) when the file lacks it or holds something else there. A reader that needs
a field decides for itself whether its absence is an error. ``appliance/preflight.py`` keeps its own small reader:
it ships alone and may use only the standard library.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import InputError

__all__ = ["PlanFile", "read_plan_document", "read_plan_file"]


def read_plan_document(path: Path) -> dict[str, Any]:
    """``plan.json`` as a dict; InputError saying what is wrong when it is missing or not a JSON object."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InputError(
            f"Cannot read the vLLM plan {path}: {why}.",
            "Write it with `clinic-edge plan MODEL --write-env /etc/clinic-edge/vllm` (the installer does), or pass "
            "--plan with the right path.",
        ) from exc
    if not isinstance(doc, dict):
        raise InputError(f"The vLLM plan {path} is not a JSON object.", "Write it again with `clinic-edge plan`.")
    return doc


def read_plan_file(path: Path) -> PlanFile:
    """``plan.json``, typed; InputError when it is missing or not a JSON object (see :func:`read_plan_document`)."""
    return PlanFile.from_document(read_plan_document(path))


@dataclass(frozen=True)
class PlanFile:
    """The fields of ``plan.json`` that its readers use; ``document`` is the whole of it, as read."""

    document: Mapping[str, Any]
    verdict: str | None
    served_model_name: str | None
    # served_model_name, else ``model`` when a hand-written file gives the model as a plain name.
    model_name: str | None
    # hardware.name (else hardware.profile, else a plain ``hardware``): "h100", "dgx-spark", "custom", "cpu".
    hardware_name: str | None
    # Planned for a CUDA box with unified memory (DGX Spark): the start gate's case.
    unified: bool
    # What the box had free when it was planned there (``--hardware auto``).
    available_gib: float | None
    total_gib: float | None
    gpu_memory_utilization: float | None
    requested_bytes: int | None
    weights_gib: float | None
    weights_source: str | None
    unified_reserve_gib: float | None
    vllm_version: str | None
    multimodal: bool
    images_per_request: float | None
    concurrency: int | None
    max_model_len: int | None
    max_concurrency: float | None
    kv_cache_gib: float | None
    replicas: int | None  # topology.replicas
    tp: int | None  # topology.tp
    # Each replica's port, when the file lists every one.
    replica_ports: tuple[int, ...]
    # Replica 0's arguments after ``python -m vllm.entrypoints.openai.api_server``.
    vllm_args: tuple[str, ...]

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> PlanFile:
        """The typed view of a parsed ``plan.json``; never raises."""
        hardware = _mapping(doc.get("hardware"))
        model = doc.get("model")
        topology = _mapping(doc.get("topology"))
        listed = doc.get("replicas")
        ports = [_int(r.get("port")) for r in listed if isinstance(r, dict)] if isinstance(listed, list) else []
        args = doc.get("vllm_args")
        served = _str(doc.get("served_model_name"))
        return cls(
            document=doc,
            verdict=_text(doc.get("verdict")),
            served_model_name=served,
            model_name=_text(doc.get("served_model_name")) or _text(model),
            hardware_name=(
                _text(hardware.get("name")) or _text(hardware.get("profile"))
                if isinstance(doc.get("hardware"), dict)
                else _text(doc.get("hardware"))
            ),
            unified=bool(hardware.get("unified")) and hardware.get("kind") == "cuda",
            available_gib=_number(hardware.get("available_gib")),
            total_gib=_number(doc.get("total_gib")),
            gpu_memory_utilization=_number(doc.get("gpu_memory_utilization")),
            requested_bytes=_int(doc.get("requested_bytes")),
            weights_gib=_number(doc.get("weights_gib")),
            weights_source=_str(doc.get("weights_source")),
            unified_reserve_gib=_number(doc.get("unified_reserve_gib")),
            vllm_version=_str(doc.get("vllm_version")),
            multimodal=isinstance(model, dict) and bool(model.get("multimodal")),
            images_per_request=_number(doc.get("images_per_request")),
            concurrency=_int(doc.get("concurrency")),
            max_model_len=_int(doc.get("max_model_len")),
            max_concurrency=_number(doc.get("max_concurrency")),
            kv_cache_gib=_number(doc.get("kv_cache_gib")),
            replicas=_int(topology.get("replicas")),
            tp=_int(topology.get("tp")),
            replica_ports=tuple(p for p in ports if p) if ports and all(ports) else (),
            vllm_args=tuple(str(a) for a in args) if isinstance(args, list) else (),
        )


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _text(value: Any) -> str | None:
    """A non-empty name; numbers count (a hand-written ``"verdict": 1`` reads as "1"), true/false do not."""
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) and str(value) else None
