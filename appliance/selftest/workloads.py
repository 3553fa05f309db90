"""What the self-test sends: prompts of exact token lengths, synthetic dental conversations, a made-up radiograph.

Nothing here comes from a patient. Prompts are seeded random sequences of dental words (every request different from
its first word, so vLLM's prefix cache cannot flatter the figures); conversations are written for the purpose; the
image is drawn from noise and ellipses, different on every run so that the image cache cannot flatter it either.

Exact prompt lengths: with the model's tokenizer (``transformers`` loading the model directory) a prompt is exactly
``n`` tokens of user content, as ``vllm bench serve``'s random dataset counts them (the chat template adds its own
few). Without a tokenizer the lengths come from a words-per-token ratio calibrated against the server's own
``usage.prompt_tokens`` (see :class:`PromptMaker`), good to a few percent.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CONVERSATIONS",
    "IMAGE_QUESTION",
    "Conversation",
    "PromptMaker",
    "RemoteTokenizer",
    "conversation_turns",
    "image_message",
    "load_tokenizer",
    "model_takes_images",
    "radiograph_png",
]

_WORDS_TEXT = (
    "molar premolar incisor canine crown root apex pulp dentin enamel cementum periodontal ligament "
    "lamina dura alveolar crest bone loss furcation caries lesion radiolucency radiopacity restoration "
    "amalgam composite implant abutment bridge pontic canal obturation gutta percha periapical bitewing "
    "panoramic cephalometric maxillary mandibular sinus nerve foramen mesial distal buccal lingual "
    "occlusal proximal cervical calculus gingiva pocket depth millimetre left right upper lower first "
    "second third quadrant impacted erupted angulation resorption widening sclerosis cyst granuloma "
    "fracture margin overhang contact point tooth radiograph image density contour shadow border cortical "
    "trabecular pattern symmetric healthy follow review"
)
WORDS = tuple(_WORDS_TEXT.split())

IMAGE_QUESTION = "Describe this radiograph: note caries, bone loss and periapical findings, tooth by tooth."


def load_tokenizer(model_dir: Path) -> Any | None:
    """The model's tokenizer via ``transformers`` (offline), or ``None`` when it cannot be loaded here."""
    if importlib.util.find_spec("transformers") is None or not (model_dir / "tokenizer_config.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # its config warnings are not the clinic's business
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception:  # any loading problem means "no tokenizer": the calibrated fallback takes over
        return None


class RemoteTokenizer:
    """The model's own tokenizer through vLLM's ``/tokenize`` and ``/detokenize`` (vLLM directly, not the gateway).

    On the box clinic-edge's venv has no ``transformers``; vLLM's endpoints give exact counts all the same. Calls are
    blocking and made only while a load point's requests are prepared, before its clock starts.
    """

    def __init__(self, base_url: str, model: str, headers: dict[str, str], ssl_context: Any = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.headers = headers
        self.ssl_context = ssl_context

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import json
        import urllib.request

        req = urllib.request.Request(  # noqa: S310 - the target's own http(s) URL
            self.base_url + path, data=json.dumps(body).encode(), headers=self.headers, method="POST"
        )
        with urllib.request.urlopen(req, timeout=10, context=self.ssl_context) as resp:  # noqa: S310
            doc = json.loads(resp.read())
        if not isinstance(doc, dict):
            raise ValueError(f"{path} answered {type(doc).__name__}")
        return doc

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``."""
        doc = self._post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens})
        return [int(t) for t in doc["tokens"]]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``."""
        return str(self._post("/detokenize", {"model": self.model, "tokens": list(ids)})["prompt"])

    def works(self) -> bool:
        """True when the endpoints answer (vLLM directly; a gateway does not expose them)."""
        try:
            return bool(self.encode("molar")) and isinstance(self.decode(self.encode("molar")), str)
        except Exception:  # any failure means "not available here": the next method takes over
            return False


class PromptMaker:
    """Prompts of a given token length: exact with a tokenizer, calibrated otherwise.

    ``tokens_per_word`` is the fallback's slope (calibrate it with :meth:`calibrate` from two server-side counts).
    """

    def __init__(self, tokenizer: Any | None = None, tokens_per_word: float = 1.6) -> None:
        self.tokenizer = tokenizer
        self.tokens_per_word = tokens_per_word

    @property
    def exact(self) -> bool:
        """True when lengths are exact token counts (a tokenizer is loaded)."""
        return self.tokenizer is not None

    @staticmethod
    def words(count: int, seed: int) -> str:
        """``count`` seeded random dental words."""
        rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
        return " ".join(rng.choice(WORDS) for _ in range(max(count, 1)))

    def calibrate(self, short: tuple[int, int], long: tuple[int, int]) -> None:
        """Set the slope from two (words, server prompt_tokens) pairs; the template's constant cancels out."""
        (w1, t1), (w2, t2) = short, long
        if w2 > w1 and t2 > t1:
            self.tokens_per_word = (t2 - t1) / (w2 - w1)

    def count(self, text: str) -> int | None:
        """Tokens in ``text`` (user content only), when a tokenizer is loaded."""
        if self.tokenizer is None:
            return None
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, n_tokens: int, seed: int) -> str:
        """A prompt of ``n_tokens`` tokens (exact with a tokenizer), different for every ``seed``."""
        if self.tokenizer is None:
            return self.words(round(n_tokens / self.tokens_per_word), seed)
        tokenizer = self.tokenizer

        def encode(s: str) -> list[int]:
            return list(tokenizer.encode(s, add_special_tokens=False))

        source = self.words(n_tokens + 16, seed)
        ids = encode(source)
        while len(ids) < n_tokens + 8:  # a tokenizer that merges a lot: add words until there is enough
            source += " " + self.words(n_tokens, seed + len(ids) + 1)
            ids = encode(source)
        # Decoding a cut and re-encoding can merge across the cut: adjust the cut until the count is exact.
        best, best_err = "", n_tokens
        cut = n_tokens
        for _ in range(12):
            candidate = tokenizer.decode(ids[:cut], skip_special_tokens=True)
            got = len(encode(candidate))
            if abs(got - n_tokens) < best_err or not best:
                best, best_err = candidate, abs(got - n_tokens)
            if got == n_tokens:
                break
            cut = max(1, cut + (n_tokens - got))
        return best


@dataclass(frozen=True)
class Conversation:
    """A scripted multi-turn exchange: (user, assistant) pairs; the assistant text is replayed as history."""

    title: str
    turns: tuple[tuple[str, str], ...]


CONVERSATIONS: tuple[Conversation, ...] = (
    Conversation(
        "periapical lesion follow-up",
        (
            (
                "A periapical radiograph of a lower left first molar shows a round radiolucency at the mesial root "
                "apex, about three millimetres across. What could it be?",
                "A round apical radiolucency of that size is most often a periapical granuloma or cyst from pulp "
                "necrosis. Check vitality, percussion and whether the lamina dura is lost around the apex.",
            ),
            (
                "The tooth does not respond to cold and is tender to percussion. The lamina dura is gone at the apex.",
                "That points to symptomatic apical periodontitis. Root canal treatment is the usual choice; review "
                "the lesion on a periapical image six to twelve months after obturation.",
            ),
            ("What should the follow-up radiograph show if healing goes well?", ""),
        ),
    ),
    Conversation(
        "bitewing caries check",
        (
            (
                "On a right bitewing I see a dark triangle under the distal contact of the upper second premolar. "
                "Is that caries or cervical burnout?",
                "Cervical burnout sits at the neck between enamel and the bone crest and fades at its edges; caries "
                "sits just below the contact point. Below the contact, with a sharp border, caries is likelier.",
            ),
            ("It reaches just past the enamel-dentin junction. Restore or monitor?", ""),
        ),
    ),
    Conversation(
        "panoramic third molar",
        (
            (
                "A panoramic image shows a mesioangular impacted lower right third molar whose roots overlap the "
                "mandibular canal. Which signs suggest a close relation to the nerve?",
                "Darkening of the root where the canal crosses it, interruption of the canal's white lines, "
                "diversion or narrowing of the canal, and a narrowed root all suggest close contact.",
            ),
            (
                "The canal's upper white line is interrupted and the root is darker there.",
                "Two signs together raise the risk of nerve injury; a cone-beam scan before surgery is reasonable, "
                "and coronectomy is an option to discuss.",
            ),
            ("Summarise that for the referral letter in three sentences.", ""),
        ),
    ),
    Conversation(
        "periodontal bone levels",
        (
            (
                "Full-mouth periapicals show horizontal bone loss of about thirty percent of root length around the "
                "lower incisors, with calculus on the proximal surfaces. How would you stage it?",
                "Thirty percent loss in the coronal third of the root fits stage two if no tooth was lost to "
                "periodontitis and probing depths stay at five millimetres or less.",
            ),
            ("Probing depths are up to six millimetres on two sites.", ""),
        ),
    ),
    Conversation(
        "implant check",
        (
            (
                "A one-year periapical of an implant at the upper left first premolar shows the bone level at the "
                "first thread on both sides. Is that normal?",
                "Some remodelling in the first year is expected; bone at the first thread is within the usual range "
                "for many systems. Compare with the radiograph taken at loading.",
            ),
            ("At loading the bone was at the implant shoulder. Is the change a concern?", ""),
        ),
    ),
    Conversation(
        "root canal quality",
        (
            (
                "After root canal treatment of an upper central incisor, the filling ends two millimetres short of "
                "the radiographic apex and shows a void in the middle third. How do you judge it?",
                "Ending up to two millimetres short is acceptable; a void in the middle third weakens the seal. "
                "Consider re-treatment if there are symptoms or the apical lesion does not heal.",
            ),
            ("There is no lesion and no symptoms. What follow-up do you suggest?", ""),
        ),
    ),
)


def conversation_turns(conv: Conversation, system: str | None = None) -> list[list[dict[str, Any]]]:
    """The message lists of each turn: every earlier turn with its scripted answer, then the new question."""
    history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    out: list[list[dict[str, Any]]] = []
    for user, assistant in conv.turns:
        out.append([*history, {"role": "user", "content": user}])
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant or "Noted."}]
    return out


def radiograph_png(seed: int, size: tuple[int, int] = (768, 384)) -> bytes:
    """A grayscale, panoramic-looking PNG drawn from ellipses and noise — no patient data; unseen for each seed."""
    from PIL import Image, ImageChops, ImageDraw, ImageFilter

    w, h = size
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    img = Image.new("L", size, 18)
    draw = ImageDraw.Draw(img)
    # Jaw arches (bright bone bands), then teeth along them with darker pulp chambers.
    for top, shade in ((0.18, 90), (0.55, 100)):
        draw.ellipse([w * 0.06, h * top, w * 0.94, h * (top + 0.55)], outline=shade, width=int(h * 0.09))
    teeth = 14
    for row, (y0, y1) in enumerate(((0.22, 0.48), (0.52, 0.80))):
        for i in range(teeth):
            x = w * (0.14 + 0.72 * i / (teeth - 1))
            tw = w * 0.022 + rng.uniform(-2, 2)
            lift = abs(i - (teeth - 1) / 2) * h * 0.012 * (1 if row == 0 else -1)
            box = [x - tw, h * y0 - lift, x + tw, h * y1 - lift]
            draw.rounded_rectangle(box, radius=int(tw), fill=200 + rng.randint(-25, 35))
            draw.line([x, box[1] + (box[3] - box[1]) * 0.2, x, box[3] - 4], fill=70, width=max(2, int(tw / 3)))
    # Film grain from the seeded generator (Image.effect_noise would ignore the seed).
    grain = Image.frombytes("L", size, rng.randbytes(w * h)).filter(ImageFilter.GaussianBlur(1.2))
    img = ImageChops.add(img.filter(ImageFilter.GaussianBlur(2.0)), grain, scale=1.6, offset=-64)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def image_message(png: bytes, question: str = IMAGE_QUESTION) -> list[dict[str, Any]]:
    """A user message with the image inline as a data URL, as the dental workstation sends it."""
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def model_takes_images(model_dir: Path | None) -> bool | None:
    """From the model's ``config.json``: ``True`` with a vision config, ``False`` without, ``None`` when unknown."""
    if model_dir is None or not (model_dir / "config.json").is_file():
        return None
    import json

    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return bool(cfg.get("vision_config") or cfg.get("image_token_id") or cfg.get("image_token_index"))
