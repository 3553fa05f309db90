"""Load points and how they run: the quick gate, the reference sweep, a single point, and the gateway's share.

A load point sends ``requests`` requests with at most ``concurrency`` in flight, all released at once behind a
semaphore — ``vllm bench serve --request-rate inf --max-concurrency N``. Its duration runs from before the first
request to after the last, as vLLM's does. Unlike vLLM's, the ``concurrency`` connections are opened before the clock
starts (a workstation keeps its connections open; handshakes are not the server's latency). Conversations replay
each scripted exchange turn by turn (a turn waits for the previous answer), ``concurrency`` exchanges at a time.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, TextIO

import aiohttp

from appliance.errors import UnreachableError, UsageError
from appliance.selftest.client import Target, make_session, open_connections, stream_chat
from appliance.selftest.metrics import RequestMeasure, RequestTimeline, measure, summarize
from appliance.selftest.workloads import (
    CONVERSATIONS,
    PromptMaker,
    conversation_turns,
    image_message,
    radiograph_png,
)
from appliance.wire import chat_request

__all__ = [
    "SWEEP_CONCURRENCY",
    "SWEEP_PROMPT_TOKENS",
    "LoadPoint",
    "Progress",
    "Workload",
    "gateway_share",
    "plan_quick",
    "plan_single",
    "plan_sweep",
    "run_points",
    "warm_up",
]

PointKind = Literal["text", "conversation", "image"]

SWEEP_PROMPT_TOKENS = (128, 512, 2048)
SWEEP_CONCURRENCY = (1, 4, 16, 64)
QUICK_PROMPT_TOKENS = 128
QUICK_MAX_TOKENS = 32
SWEEP_MAX_TOKENS = 64
IMAGE_MAX_TOKENS = 64
# Room the chat template and the answer need beside the prompt when clipping to the model's max length.
TEMPLATE_MARGIN = 32


@dataclass(frozen=True)
class LoadPoint:
    """One measurement: what to send, how many, how many at once, and whether the verdict judges it."""

    name: str
    kind: PointKind
    concurrency: int
    requests: int
    prompt_tokens: int
    max_tokens: int
    judged: bool = False
    clipped_from: int | None = None

    def describe(self) -> str:
        """A short label for progress lines and tables."""
        if self.kind == "conversation":
            return f"conversations × batch {self.concurrency}"
        if self.kind == "image":
            return "image request"
        return f"{self.prompt_tokens}-token prompts × concurrency {self.concurrency}"


def _clip(tokens: int, max_tokens: int, max_model_len: int | None) -> tuple[int, int | None]:
    if max_model_len is None or tokens + max_tokens + TEMPLATE_MARGIN <= max_model_len:
        return tokens, None
    return max(16, max_model_len - max_tokens - TEMPLATE_MARGIN), tokens


def plan_quick(clinic_concurrency: int, with_image: bool) -> list[LoadPoint]:
    """The post-install gate: short prompts at concurrency 1 and the clinic's, plus one image request."""
    points = [LoadPoint("short-c1", "text", 1, 8, QUICK_PROMPT_TOKENS, QUICK_MAX_TOKENS)]
    c = max(1, clinic_concurrency)
    if c == 1:
        points = [replace(points[0], judged=True)]
    else:
        points.append(LoadPoint(f"short-c{c}", "text", c, max(6 * c, 16), QUICK_PROMPT_TOKENS, QUICK_MAX_TOKENS, True))
    if with_image:
        points.append(LoadPoint("image", "image", 1, 1, 0, IMAGE_MAX_TOKENS))
    return points


def plan_sweep(
    clinic_concurrency: int,
    with_image: bool,
    max_model_len: int | None,
    *,
    requests: int | None = None,
    prompt_tokens: Sequence[int] = SWEEP_PROMPT_TOKENS,
    concurrencies: Sequence[int] = SWEEP_CONCURRENCY,
) -> list[LoadPoint]:
    """The reference sweep: prompt lengths × concurrency (clipped to the model), conversations, one image."""
    points: list[LoadPoint] = []
    seen: set[tuple[int, int]] = set()
    for p in prompt_tokens:
        tokens, clipped = _clip(p, SWEEP_MAX_TOKENS, max_model_len)
        for c in concurrencies:
            if (tokens, c) in seen:
                continue
            seen.add((tokens, c))
            n = requests or max(8, 2 * c)
            judged = p == min(prompt_tokens) and c == clinic_concurrency
            points.append(LoadPoint(f"p{tokens}-c{c}", "text", c, n, tokens, SWEEP_MAX_TOKENS, judged, clipped))
    if not any(pt.judged for pt in points):
        tokens, clipped = _clip(min(prompt_tokens), SWEEP_MAX_TOKENS, max_model_len)
        n = requests or max(8, 2 * clinic_concurrency)
        points.append(
            LoadPoint(f"p{tokens}-c{clinic_concurrency}", "text", clinic_concurrency, n, tokens, SWEEP_MAX_TOKENS, True)
        )
    turns = sum(len(c.turns) for c in CONVERSATIONS)
    for batch in (1, 4):
        points.append(LoadPoint(f"conversations-b{batch}", "conversation", batch, turns, 0, SWEEP_MAX_TOKENS))
    if with_image:
        points.append(LoadPoint("image", "image", 1, 1, 0, IMAGE_MAX_TOKENS))
    return points


def plan_single(concurrency: int, requests: int, prompt_tokens: int, max_tokens: int) -> list[LoadPoint]:
    """One load point, asked for directly; it is the one the verdict judges."""
    if min(concurrency, requests, prompt_tokens, max_tokens) < 1:
        raise UsageError(
            "--concurrency, --requests, --prompt-tokens and --max-tokens must all be at least 1.",
            "Example: clinic-edge selftest --target URL --concurrency 4 --requests 32 --prompt-tokens 128 "
            "--max-tokens 32",
        )
    return [
        LoadPoint(f"p{prompt_tokens}-c{concurrency}", "text", concurrency, requests, prompt_tokens, max_tokens, True)
    ]


@dataclass
class Workload:
    """What the requests carry: the model name, the prompt maker, and a per-run seed."""

    model: str
    prompts: PromptMaker
    seed: int = field(default_factory=lambda: random.SystemRandom().randrange(1 << 30))
    # Synthetic prompts run to max_tokens, as ``vllm bench serve`` does for its random datasets: an early
    # end-of-sequence would leave TPOT and ITL with one or no gap to measure, and change the load.
    ignore_eos: bool = True
    _counter: int = 0

    def next_seed(self) -> int:
        """A fresh seed for every request of the run (no two prompts alike)."""
        self._counter += 1
        return self.seed * 1_000_003 + self._counter

    def text_body(self, prompt_tokens: int, max_tokens: int) -> dict[str, Any]:
        """A chat request whose user content has ``prompt_tokens`` tokens.

        The content is a list of parts, as ``vllm bench serve`` (openai-chat) and the workstations (image + text)
        send it: vLLM parses that form on a heavier path than a plain string, and the load must be the same.
        """
        text = self.prompts.text(prompt_tokens, self.next_seed())
        content = [{"type": "text", "text": text}]
        return chat_request(self.model, [{"role": "user", "content": content}], max_tokens=max_tokens, **self.fixed())

    def image_body(self, max_tokens: int) -> dict[str, Any]:
        """A chat request with one freshly drawn radiograph-like image (never patient data)."""
        return chat_request(
            self.model, image_message(radiograph_png(self.next_seed())), max_tokens=max_tokens, **self.fixed()
        )

    def fixed(self) -> dict[str, Any]:
        """vLLM's ``ignore_eos`` sampling option when synthetic requests must run to their length."""
        return {"ignore_eos": True} if self.ignore_eos else {}


class Progress:
    """Progress for people on standard error: a live line on a terminal, one line per load point otherwise."""

    def __init__(self, total_points: int, out: TextIO | None = None, enabled: bool = True) -> None:
        self.total = total_points
        self.out = out or sys.stderr
        self.enabled = enabled
        self.tty = self.enabled and self.out.isatty()
        self.index = 0

    def start(self, point: LoadPoint) -> None:
        """A load point begins."""
        self.index += 1
        self._label = f"[{self.index}/{self.total}] {point.describe()}"
        if self.tty:
            self.out.write(f"\r\x1b[K{self._label}: 0/{point.requests}")
            self.out.flush()

    def request_done(self, done: int, total: int) -> None:
        """One more request of the current point finished."""
        if self.tty:
            self.out.write(f"\r\x1b[K{self._label}: {done}/{total}")
            self.out.flush()

    def finish(self, result: dict[str, Any]) -> None:
        """A load point ended with ``result``."""
        if not self.enabled:
            return
        ttft = result["ttft_ms"]
        figures = (
            f"TTFT p50 {ttft['p50']:.1f} ms, p99 {ttft['p99']:.1f} ms"
            if ttft["p50"] is not None
            else "no request completed"
        )
        failed = f", {result['failed']} failed" if result["failed"] else ""
        line = f"{self._label}: {result['completed']} done{failed}; {figures}"
        self.out.write(("\r\x1b[K" if self.tty else "") + line + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        """A free-form line (e.g. "measuring the gateway's share")."""
        if self.enabled:
            self.out.write(("\r\x1b[K" if self.tty else "") + text + "\n")
            self.out.flush()


Sender = Callable[[dict[str, Any]], Awaitable[RequestTimeline]]


async def _bounded(
    jobs: Sequence[Callable[[], Awaitable[list[RequestMeasure]]]], concurrency: int, progress: Progress, total: int
) -> tuple[list[RequestMeasure], float]:
    """Run ``jobs`` with at most ``concurrency`` at once; return their measures and the wall time."""
    sem = asyncio.Semaphore(concurrency)
    done = 0

    async def one(job: Callable[[], Awaitable[list[RequestMeasure]]]) -> list[RequestMeasure]:
        nonlocal done
        async with sem:
            out = await job()
        done += len(out)
        progress.request_done(done, total)
        return out

    started = time.perf_counter()
    tasks = [asyncio.create_task(one(j)) for j in jobs]
    results = await asyncio.gather(*tasks)
    return [m for r in results for m in r], time.perf_counter() - started


async def run_point(
    session: aiohttp.ClientSession,
    target: Target,
    point: LoadPoint,
    work: Workload,
    progress: Progress,
    *,
    goodput_ms: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run one load point; return its entry for the result file's ``points``."""

    async def send(body: dict[str, Any]) -> RequestMeasure:
        return measure(await stream_chat(session, target, body))

    jobs: list[Callable[[], Awaitable[list[RequestMeasure]]]] = []
    if point.kind == "text":
        bodies = [work.text_body(point.prompt_tokens, point.max_tokens) for _ in range(point.requests)]
        jobs = [functools.partial(_single, send, b) for b in bodies]
    elif point.kind == "image":
        bodies = [work.image_body(point.max_tokens) for _ in range(point.requests)]
        jobs = [functools.partial(_single, send, b) for b in bodies]
    else:
        for conv in CONVERSATIONS:
            turns = conversation_turns(conv)
            jobs.append(functools.partial(_conversation, send, work.model, turns, point.max_tokens))
    total = point.requests
    progress.start(point)
    measures, duration = await _bounded(jobs, point.concurrency, progress, total)
    metrics = summarize(measures, duration, goodput_ms)
    entry: dict[str, Any] = {
        **{k: v for k, v in asdict(point).items() if k != "requests"},
        "requests": len(measures),
        **metrics.to_dict(),
        "samples": {"ttft_ms": [round(m.ttft * 1000, 3) for m in measures if m.success and m.ttft is not None]},
    }
    progress.finish(entry)
    return entry


async def _single(
    send: Callable[[dict[str, Any]], Awaitable[RequestMeasure]], body: dict[str, Any]
) -> list[RequestMeasure]:
    return [await send(body)]


async def _conversation(
    send: Callable[[dict[str, Any]], Awaitable[RequestMeasure]],
    model: str,
    turns: list[list[dict[str, Any]]],
    max_tokens: int,
) -> list[RequestMeasure]:
    return [await send(chat_request(model, messages, max_tokens=max_tokens)) for messages in turns]


async def run_points(
    target: Target,
    points: Sequence[LoadPoint],
    work: Workload,
    progress: Progress,
    goodput_ms: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Run every load point in order, each with a connection pool sized to its concurrency.

    The heap built so far (the tokenizer's library above all) is frozen first: a full garbage collection over it
    pauses this process for tens to hundreds of milliseconds, and every stream in flight would carry that pause
    into its measured TTFT. Frozen objects are not scanned again; the run's own garbage still is.
    """
    gc.collect()
    gc.freeze()
    results = []
    for point in points:
        async with make_session(target, point.concurrency) as session:
            await open_connections(session, target, point.concurrency)
            results.append(await run_point(session, target, point, work, progress, goodput_ms=goodput_ms))
    return results


async def warm_up(target: Target, work: Workload) -> RequestMeasure:
    """One short request before measuring (vLLM's "initial test run"); raise when the target cannot serve.

    Not ready (connection refused, 502/503/504, timeout) → :class:`UnreachableError`; a refused key or an unknown
    model → :class:`UsageError`. Other failures are returned: the run goes on and counts them.
    """
    async with make_session(target, 1) as session:
        tl = await stream_chat(session, target, work.text_body(16, 4))
    m = measure(tl)
    if m.success:
        return m
    if tl.status is None or tl.status in (502, 503, 504):
        raise UnreachableError(
            f"{target.base} could not generate a first answer: {m.error}",
            "The service is up but not ready to generate: wait for vLLM to finish loading, then check "
            "'clinic-edge status' and 'journalctl -u clinic-edge-vllm@0 -u clinic-edge-gateway'.",
        )
    if tl.status in (401, 403):
        raise UnreachableError(
            f"{target.base} refused the API key (HTTP {tl.status}).",
            "Give a valid workstation key with --api-key or CLINIC_EDGE_API_KEY ('clinic-edge keys add selftest').",
        )
    if tl.status in (400, 404):
        raise UsageError(
            f"{target.base} rejected the self-test's request: {m.error}",
            f"Check --model (now {work.model!r}) is a model the target serves ('curl {target.base}/v1/models').",
        )
    return m


async def gateway_share(
    gateway: Target, direct: Target, work: Workload, progress: Progress, pairs: int = 16
) -> dict[str, Any]:
    """The gateway's share of TTFT: short requests alternating gateway/direct, one at a time; p50 difference.

    Alternating (and swapping the order every pair) spreads drift in the server's speed evenly over both sides;
    every request has its own prompt, so the prefix cache favours neither.
    """
    progress.note(f"Measuring the gateway's share of TTFT ({pairs} interleaved pairs)…")
    gw: list[float] = []
    dr: list[float] = []
    failed = 0
    async with make_session(gateway, 1) as gs, make_session(direct, 1) as ds:
        await open_connections(gs, gateway, 1)
        await open_connections(ds, direct, 1)
        for i in range(pairs + 1):
            order = ((gs, gateway, gw), (ds, direct, dr))
            for session, tgt, sink in order if i % 2 == 0 else order[::-1]:
                m = measure(await stream_chat(session, tgt, work.text_body(QUICK_PROMPT_TOKENS, 8)))
                if i == 0:
                    continue  # the first pair warms both paths up: not counted
                if m.success and m.ttft is not None:
                    sink.append(m.ttft * 1000)
                else:
                    failed += 1
    if not gw or not dr:
        return {"gateway_share_ms": None, "pairs": pairs, "failed": failed}
    g50, d50 = statistics.median(gw), statistics.median(dr)
    return {
        "gateway_share_ms": g50 - d50,
        "gateway_ttft_p50_ms": g50,
        "direct_ttft_p50_ms": d50,
        "pairs": pairs,
        "failed": failed,
        "direct": direct.base,
    }
