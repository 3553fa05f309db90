"""Checks on a chat-completions request before anything reaches vLLM; rewrites it into what is forwarded.

Rules (each rejection is a :class:`RejectedError` with a status, a machine-readable code and a message for the
workstation developer):

* the body is one JSON object of at most ``max_body_bytes`` (checked while reading, in :mod:`http11`) that standard
  JSON can carry: nested at most :data:`MAX_DEPTH` deep, no NaN or Infinity (nor numbers too large for a double),
  no unpaired UTF-16 surrogate escapes (``"\ud800"`` alone cannot be written as UTF-8, so vLLM could not read it);
* content parts are ``text`` or ``image_url`` only — audio, video, files and embeddings are refused;
* images are inline ``data:image/png|jpeg|webp;base64,...`` or ``data:application/dicom;base64,...``: remote URLs
  (vLLM would fetch them itself), ``file:`` and every other scheme or MIME type are refused, so the gateway and vLLM
  open no outbound connection;
* at most ``max_images`` images, each at most ``max_image_bytes`` decoded and ``max_image_pixels`` pixels, all
  read from the base64 text and the image header (see :mod:`images`) — nothing is decoded in full; a DICOM file is
  checked for size here and converted to PNG later, off the event loop (see :mod:`dicom`): its part is forwarded as
  ``data:image/png;base64,`` followed by an empty slot in ``body`` that the conversion fills;
* ``n`` is forced to 1 and ``max_tokens`` capped; request-supplied chat templates and processor overrides are refused.

Speed: base64 payloads are cut out of the body before ``json.loads`` (a 4 MB string costs the JSON scanner
milliseconds) and spliced back, byte for byte, into the re-serialised request. The forwarded body is always our
own serialisation of the object we checked, so vLLM parses exactly what we validated.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from appliance.gateway.images import ImageError, sniff_base64_image

__all__ = ["MAX_DEPTH", "DicomPart", "Limits", "RejectedError", "ValidRequest", "validate_chat"]

_B64_MARK = b";base64,"
_CUT_MIN = 512  # shorter payloads stay in the JSON (cutting them buys nothing)
_DATA_URL = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),")
_MEDIA_KEYS = frozenset(
    ("image_url", "audio_url", "video_url", "input_audio", "image_pil", "image_embeds", "file", "input_image")
)
_REFUSED_FIELDS = {
    "chat_template": "a request-supplied chat template",
    "mm_processor_kwargs": "per-request image processor settings",
}
_MIME_FORMATS = {
    "image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/webp": "webp", "application/dicom": "dicom",
}  # fmt: skip
_PNG_URL = "data:image/png;base64,"
MAX_DEPTH = 64  # a chat request nests ~6 deep; tool schemas a few more (vLLM's parser refuses ~200)


class _NonFiniteError(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFiniteError(name)


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
# allow_nan=False: a number that parsed as infinity (1e999) raises instead of becoming the non-JSON 'Infinity'.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
INLINE_HINT = (
    "Send the radiograph inline: read the PNG, JPEG or DICOM file and put it in the request as "
    '{"type": "image_url", "image_url": {"url": "data:image/png;base64,<base64 of the file>"}} '
    "(see docs/workstation.md)."
)


@dataclass(frozen=True)
class Limits:
    """The request limits (from :class:`~appliance.gateway.config.GatewayConfig`)."""

    max_images: int = 4
    max_image_bytes: int = 12 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_tokens_cap: int = 2048


class RejectedError(Exception):
    """A request refused before it reached vLLM; ``message`` is safe to return (it never quotes content)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class DicomPart:
    """A DICOM image waiting for conversion: its base64 is ``buf[start:end]``; its PNG goes to ``body[slot]``."""

    where: str  # "messages[0].content[1]", for the error message
    buf: bytes | bytearray
    start: int
    end: int
    slot: int = -1

    def base64(self) -> bytes:
        """A copy of the base64 text (the worker process receives it through a pipe)."""
        return bytes(self.buf[self.start : self.end])


@dataclass(slots=True)
class ValidRequest:
    """A checked request: the body to forward and the facts the audit log records."""

    body: list[bytes | memoryview]  # the forwarded body, in pieces (big images are views of the received body)
    stream: bool
    model: str
    body_bytes: int = 0
    images: int = 0
    image_bytes: int = 0
    image_formats: list[str] = field(default_factory=list)
    dicoms: list[DicomPart] = field(default_factory=list)  # to convert before forwarding; slots set


class _Cut:
    """Base64 payloads taken out of the raw body, replaced by ``@ce-<nonce>-<i>@`` markers."""

    def __init__(self, body: bytes | bytearray) -> None:
        self.prefix = ""  # made only when something is cut (most requests carry no image)
        self.body = body
        self.segments: list[tuple[int, int]] = []  # (start, end) in body: never copied
        pieces: list[bytes | bytearray] = []
        copied = search = 0
        while True:
            i = body.find(_B64_MARK, search)
            if i < 0:
                break
            start = i + len(_B64_MARK)
            end = body.find(b'"', start)
            if end < 0:
                break
            search = end
            # No backslash before the closing quote: the quote ends the JSON string and the run between is raw.
            if end - start >= _CUT_MIN and body.find(b"\\", start, end) < 0:
                if not self.prefix:
                    self.prefix = f"@ce-{secrets.token_hex(8)}-"
                pieces += (body[copied:start], f"{self.prefix}{len(self.segments)}@".encode())
                self.segments.append((start, end))
                copied = end
        pieces.append(body[copied:])
        self.small = bytes(b"".join(pieces)) if self.segments else body

    def slot_marker(self, index: int) -> str:
        """A marker for DICOM conversion ``index``'s PNG (made when the request is checked, never sent)."""
        if not self.prefix:
            self.prefix = f"@ce-{secrets.token_hex(8)}-"
        return f"{self.prefix}d{index}@"

    def payload(self, value: str) -> tuple[int, int] | None:
        """Where in the body the base64 a string's marker stands for lies, or None when it carries no marker."""
        if not self.prefix or not value.startswith(self.prefix):
            return None  # a marker after other text would hide that text from the checks
        idx = value[len(self.prefix) : -1]
        if not value.endswith("@") or not idx.isdigit() or int(idx) >= len(self.segments):
            return None
        return self.segments[int(idx)]

    def splice(self, text: str, dicoms: list[DicomPart]) -> list[bytes | memoryview]:
        """Serialised JSON with the markers replaced by views of the original base64 bytes (no copies), and an empty
        slot for each DICOM's PNG (its ``slot`` set to that piece's index)."""
        if not self.prefix:
            return [text.encode()]
        view = memoryview(self.body)
        parts = text.split(self.prefix)
        out: list[bytes | memoryview] = [parts[0].encode()]
        for part in parts[1:]:
            idx, _, rest = part.partition("@")
            if idx.startswith("d"):
                k = int(idx[1:])
                dicoms[k] = DicomPart(dicoms[k].where, dicoms[k].buf, dicoms[k].start, dicoms[k].end, len(out))
                out += (b"", rest.encode())
                continue
            start, end = self.segments[int(idx)]
            out += (view[start:end], rest.encode())
        return out


def _bad(code: str, message: str, param: str | None = None) -> RejectedError:
    return RejectedError(400, code, message, param)


def _check_image(part: dict[str, Any], where: str, cut: _Cut, limits: Limits, req: ValidRequest) -> None:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise _bad("invalid_image_url", f"{where}.image_url.url must be a string. {INLINE_HINT}", where)
    scheme = url[:16].split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme in ("http", "https"):
        raise _bad(
            "image_url_not_inline",
            f"{where} is a remote image URL. The gateway never downloads images (nothing may leave or enter the "
            f"clinic network on a request's behalf). {INLINE_HINT}",
            where,
        )
    if scheme != "data":
        shown = f"'{scheme}:'" if scheme else "no scheme"
        raise _bad(
            "image_url_not_inline",
            f"{where} uses {shown}; only inline data: URLs are accepted (no file:, ftp: or other schemes). "
            f"{INLINE_HINT}",
            where,
        )
    m = _DATA_URL.match(url, 0, 256)
    if m is None:
        raise _bad("invalid_image_url", f"{where} is not a well-formed data: URL. {INLINE_HINT}", where)
    mime = m.group(1).strip().lower()
    fmt = _MIME_FORMATS.get(mime)
    if fmt is None:
        raise _bad(
            "unsupported_image_type",
            f"{where} has type '{mime[:40]}'; accepted are image/png, image/jpeg, image/webp and "
            "application/dicom. Export the radiograph as PNG, JPEG or DICOM and send it inline.",
            where,
        )
    if m.group(2).lower() != ";base64":
        raise _bad("image_not_base64", f"{where} must be base64-encoded (data:{mime};base64,...). {INLINE_HINT}", where)
    rest = url[m.end() :]
    span = cut.payload(rest)
    buf: bytes | bytearray
    if span is None:
        try:
            buf = rest.encode("ascii")
        except UnicodeEncodeError as err:
            raise _bad("invalid_image", f"{where} is not valid base64 (non-ASCII characters).", where) from err
        start, end = 0, len(buf)
    else:
        buf = cut.body
        start, end = span
    if len(req.image_formats) >= limits.max_images:
        raise _bad(
            "too_many_images",
            f"The request carries more than {limits.max_images} images; send at most {limits.max_images} per "
            "request (split a series over several requests).",
            where,
        )
    decoded = (end - start) // 4 * 3
    if decoded > limits.max_image_bytes + 2:
        raise _bad(
            "image_too_large",
            f"{where} is {decoded / 1e6:.1f} MB decoded; the limit is {limits.max_image_bytes / 1e6:.1f} MB. "
            "Export the radiograph at a lower resolution or as JPEG.",
            where,
        )
    if fmt == "dicom":  # pixels and header are checked by the conversion, which must not run on the event loop
        req.dicoms.append(DicomPart(where, buf, start, end))
        marker = cut.slot_marker(len(req.dicoms) - 1)
        if isinstance(image, dict):
            image["url"] = _PNG_URL + marker
        else:
            part["image_url"] = _PNG_URL + marker
        req.images += 1
        req.image_bytes += decoded
        req.image_formats.append(fmt)
        return
    try:
        facts = sniff_base64_image(fmt, buf, start, end)
    except ImageError as err:
        raise _bad("invalid_image", f"{where} was refused: {err}. {INLINE_HINT}", where) from err
    if facts.decoded_bytes > limits.max_image_bytes:
        raise _bad(
            "image_too_large",
            f"{where} is {facts.decoded_bytes / 1e6:.1f} MB decoded; the limit is "
            f"{limits.max_image_bytes / 1e6:.1f} MB. Export the radiograph at a lower resolution or as JPEG.",
            where,
        )
    if facts.pixels > limits.max_image_pixels:
        raise _bad(
            "image_too_many_pixels",
            f"{where} is {facts.width}x{facts.height} pixels ({facts.pixels / 1e6:.1f} MP); the limit is "
            f"{limits.max_image_pixels / 1e6:.1f} MP. Downscale it before sending.",
            where,
        )
    req.images += 1
    req.image_bytes += facts.decoded_bytes
    req.image_formats.append(facts.format)


def _check_messages(messages: Any, cut: _Cut, limits: Limits, req: ValidRequest) -> None:
    if not isinstance(messages, list) or not messages:
        raise _bad("invalid_messages", "'messages' must be a non-empty list of chat messages.", "messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad("invalid_messages", f"messages[{i}] must be an object.", f"messages[{i}]")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _bad("invalid_messages", f"messages[{i}].content must be a string or a list of parts.")
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, str):
                continue
            if not isinstance(part, dict):
                raise _bad("invalid_content", f"{where} must be an object with a 'type'.", where)
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str) or _MEDIA_KEYS & part.keys():
                    raise _bad("invalid_content", f"{where} is a text part: it needs 'text' and nothing else.", where)
            elif kind == "image_url":
                if _MEDIA_KEYS & part.keys() != {"image_url"}:
                    raise _bad("invalid_content", f"{where} mixes media kinds; send one image per part.", where)
                _check_image(part, where, cut, limits, req)
            else:
                shown = str(kind)[:40] if kind is not None else "(none)"
                raise _bad(
                    "unsupported_content_type",
                    f"{where} has type '{shown}'; the gateway accepts 'text' and 'image_url' parts only (no audio, "
                    f"video, files or embeddings). {INLINE_HINT}",
                    where,
                )


def _cap_tokens(obj: dict[str, Any], cap: int) -> None:
    present = False
    for key in ("max_tokens", "max_completion_tokens"):
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _bad("invalid_max_tokens", f"'{key}' must be a positive integer.", key)
        present = True
        if value > cap:
            obj[key] = cap
    if not present:
        obj["max_tokens"] = cap


def _too_deep(obj: Any, limit: int) -> bool:
    """Is any value nested more than ``limit`` containers deep? (Iterative: the check must not recurse itself.)"""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values() if isinstance(v, (dict, list))]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value if isinstance(v, (dict, list))]
    return False


def _depth_error() -> RejectedError:
    return _bad("json_too_deep", f"The request body nests JSON more than {MAX_DEPTH} levels deep; flatten it.")


def _parse(small: bytes | bytearray) -> Any:
    try:
        obj = _DECODER.decode(small.decode("utf-8"))
    except _NonFiniteError as err:
        raise _bad(
            "invalid_number", f"The request body contains {err}, which is not JSON; send finite numbers only."
        ) from err
    except RecursionError as err:  # nested deeper than the interpreter's stack: certainly too deep
        raise _depth_error() from err
    except (ValueError, UnicodeDecodeError) as err:
        raise _bad("invalid_json", "The request body is not valid JSON (UTF-8 encoded).") from err
    # Nesting can only exceed the limit if there are that many brackets; counting them is a C loop.
    if small.count(b"[") + small.count(b"{") > MAX_DEPTH and _too_deep(obj, MAX_DEPTH):
        raise _depth_error()
    return obj


def validate_chat(body: bytes | bytearray, limits: Limits) -> ValidRequest:
    """Check a ``POST /v1/chat/completions`` body and return what to forward; raise :class:`RejectedError`."""
    cut = _Cut(body)
    obj = _parse(cut.small)
    if not isinstance(obj, dict):
        raise _bad("invalid_json", "The request body must be a JSON object.")
    for name, what in _REFUSED_FIELDS.items():
        if name in obj:
            raise _bad("field_not_allowed", f"'{name}' ({what}) is not accepted by the gateway; remove it.", name)
    model = obj.get("model")
    req = ValidRequest(body=[], stream=obj.get("stream") is True, model=model if isinstance(model, str) else "")
    _check_messages(obj.get("messages"), cut, limits, req)
    _cap_tokens(obj, limits.max_tokens_cap)
    obj["n"] = 1
    obj.pop("best_of", None)
    try:
        req.body = cut.splice(_ENCODER.encode(obj), req.dicoms)
    except UnicodeEncodeError as err:  # a string held an unpaired surrogate escape such as "\ud800"
        raise _bad(
            "invalid_unicode",
            "A string in the request holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff without its "
            "pair), which is not valid Unicode; fix the client's text encoding.",
        ) from err
    except ValueError as err:  # allow_nan=False: a number too large for a double (1e999)
        raise _bad(
            "invalid_number", "A number in the request is too large to be a finite double; send finite numbers."
        ) from err
    req.body_bytes = sum(map(len, req.body))
    return req
