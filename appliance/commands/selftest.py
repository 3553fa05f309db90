"""``clinic-edge selftest``: prove the box answers fast, with the figures ``vllm bench serve`` would give.

Runs (``--quick``, ``--sweep`` or one load point), judges them against the SLOs, keeps one JSON result per run under
the state directory, and ``selftest history`` shows the kept runs. Exit 0 pass, 1 fail, 2 target unreachable or not
ready (or bad input).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

import yaml

from appliance.cli import EXIT_NEGATIVE, EXIT_OK, Outcome
from appliance.errors import InputError, UnreachableError, UsageError
from appliance.selftest.client import Target, TargetInfo, make_session, probe_target, stream_chat
from appliance.selftest.history import (
    DEFAULT_KEEP,
    DEFAULT_STATE_DIR,
    check_writable,
    history_rows,
    history_table,
    load_history,
    save_run,
)
from appliance.selftest.metrics import measure
from appliance.selftest.report import render_report
from appliance.selftest.result import build_result, hardware_snapshot, read_plan, read_vllm_flags, utc_now
from appliance.selftest.runner import (
    LoadPoint,
    Progress,
    Workload,
    gateway_share,
    plan_quick,
    plan_single,
    plan_sweep,
    run_points,
    warm_up,
)
from appliance.selftest.verdict import PROFILES, Verdict, judge, slo_for
from appliance.selftest.workloads import PromptMaker, RemoteTokenizer, load_tokenizer, model_takes_images
from appliance.wire import chat_request

__all__ = ["register"]

API_KEY_ENV = "CLINIC_EDGE_API_KEY"
DEFAULT_ETC_DIR = Path("/etc/clinic-edge")
DIRECT_API_KEY_ENV = "CLINIC_EDGE_DIRECT_API_KEY"
SINGLE_FLAGS = ("concurrency", "requests", "prompt_tokens", "max_tokens")
CONFIG_KEYS = {
    "target",
    "direct",
    "model",
    "ca_cert",
    "state_dir",
    "keep",
    "profile",
    "clinic_concurrency",
    "ttft_p99_ms",
    "image_ttft_ms",
    "tpot_p99_ms",
    "e2el_p99_ms",
    "max_failed",
    "tokenizer",
    "etc_dir",
}

DESCRIPTION = """\
Measure time to first token (TTFT) and friends against the gateway (end to end) or vLLM directly, judge them
against the service-level objectives, and keep the result under the state directory.

  --quick   the post-install gate: 128-token prompts at concurrency 1 and the clinic's (4), one image request
  --sweep   the reference sweep: prompts {128, 512, 2048} × concurrency {1, 4, 16, 64} (clipped to the model's
            max length), synthetic dental conversations at batch 1 and 4, one image request
  single    --concurrency N --requests M --prompt-tokens P --max-tokens T: one load point

Metrics are defined as `vllm bench serve` defines them (TTFT = first event with choices, ITL, TPOT, E2EL,
goodput); time to first *content* is reported separately. Nothing from a patient is ever sent: prompts, the
conversations and the radiograph are synthetic.

exit codes: 0 pass · 1 fail · 2 target unreachable or not ready, or bad input
"""

EXAMPLES = """\
examples:
  clinic-edge selftest --quick --target https://clinic-box:8443 --ca-cert /etc/clinic-edge/tls/ca.crt
  CLINIC_EDGE_API_KEY=sk-... clinic-edge selftest --sweep --target https://clinic-box:8443 \\
      --direct http://127.0.0.1:8000 --report /tmp/selftest.html
  clinic-edge selftest --target http://127.0.0.1:8000 --concurrency 8 --requests 64 --prompt-tokens 64 \\
      --max-tokens 32 --json
  clinic-edge selftest history
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``selftest`` (and its ``history`` action)."""
    p = subparsers.add_parser(
        "selftest",
        parents=[common],
        help="measure TTFT like vllm bench serve, judge it, keep history",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "action", nargs="?", choices=("run", "history"), default="run", help="run a test (default) or show history"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the post-install gate (default)")
    mode.add_argument("--sweep", action="store_true", help="the reference sweep (minutes)")
    p.add_argument(
        "--target", metavar="URL", help="gateway or vLLM URL, e.g. https://clinic-box:8443 or http://127.0.0.1:8000"
    )
    p.add_argument("--api-key", metavar="KEY", help=f"workstation key (better: the {API_KEY_ENV} environment variable)")
    p.add_argument("--model", metavar="NAME", help="model to ask (default: the first in GET /v1/models)")
    p.add_argument("--ca-cert", type=Path, metavar="PATH", help="clinic CA certificate to trust over HTTPS")
    p.add_argument("--direct", metavar="URL", help="vLLM's loopback URL too: also measure the gateway's share of TTFT")
    p.add_argument(
        "--state-dir", type=Path, metavar="DIR", help=f"where results are kept (default {DEFAULT_STATE_DIR})"
    )
    p.add_argument("--keep", type=int, metavar="N", help=f"runs to keep (default {DEFAULT_KEEP})")
    p.add_argument("--report", type=Path, metavar="FILE.html", help="also write a self-contained HTML report")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML file with any of these options (flags win)")
    p.add_argument(
        "--etc-dir",
        type=Path,
        metavar="DIR",
        help="where the plan and vLLM env files are, for the snapshot (default /etc/clinic-edge)",
    )
    p.add_argument("--profile", choices=PROFILES, help="SLO defaults: gpu or cpu (default: gpu if NVML sees one)")
    p.add_argument(
        "--clinic-concurrency", type=int, metavar="N", help="workstations asking at once; the verdict's point (4)"
    )
    p.add_argument(
        "--slo-ttft-p99-ms", dest="ttft_p99_ms", type=float, metavar="MS", help="TTFT p99 limit (gpu 100, cpu 1500)"
    )
    p.add_argument(
        "--slo-image-ttft-ms",
        dest="image_ttft_ms",
        type=float,
        metavar="MS",
        help="image TTFT limit (gpu 1000, cpu 5000)",
    )
    p.add_argument(
        "--slo-tpot-p99-ms", dest="tpot_p99_ms", type=float, metavar="MS", help="TPOT p99 limit (default: none)"
    )
    p.add_argument(
        "--slo-e2el-p99-ms", dest="e2el_p99_ms", type=float, metavar="MS", help="E2EL p99 limit (default: none)"
    )
    p.add_argument("--max-failed", type=int, metavar="N", help="failed requests allowed (default 0)")
    p.add_argument("--image", choices=("auto", "yes", "no"), default="auto", help="send the image request (auto)")
    p.add_argument(
        "--tokenizer", type=Path, metavar="DIR", help="model directory with the tokenizer (default: vLLM's model path)"
    )
    p.add_argument("--concurrency", type=int, metavar="N", help="single point: requests in flight at once")
    p.add_argument("--requests", type=int, metavar="M", help="single point: number of requests (sweep: per point)")
    p.add_argument("--prompt-tokens", type=int, metavar="P", help="single point: prompt length in tokens")
    p.add_argument("--max-tokens", type=int, metavar="T", help="single point: tokens to generate per request")
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="synthetic prompts generate all their tokens, as vllm bench serve does for random prompts "
        "(default: on; conversations always end where the model ends them)",
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, metavar="S", help="seconds one request may take (default 120)"
    )
    p.set_defaults(func=_main)


def _load_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.config is None:
        return {}
    try:
        doc = yaml.safe_load(args.config.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"Cannot read --config {args.config}: {exc}", "Fix or remove the file.") from exc
    if not isinstance(doc, dict):
        raise InputError(f"--config {args.config} is not a YAML mapping.", "Write 'key: value' lines.")
    doc = {str(k).replace("-", "_"): v for k, v in doc.items()}
    unknown = set(doc) - CONFIG_KEYS
    if unknown:
        raise InputError(
            f"--config {args.config} has unknown keys: {', '.join(sorted(unknown))}.",
            f"Known keys: {', '.join(sorted(CONFIG_KEYS))}.",
        )
    return doc


def _opt(args: argparse.Namespace, cfg: dict[str, Any], name: str, default: Any = None) -> Any:
    value = getattr(args, name, None)
    if value is not None:
        return value
    return cfg.get(name, default)


def _main(args: argparse.Namespace) -> Outcome:
    cfg = _load_config(args)
    state_dir = Path(_opt(args, cfg, "state_dir", DEFAULT_STATE_DIR))
    if args.action == "history":
        return _history(state_dir, args.report)
    return _run(args, cfg, state_dir)


def _history(state_dir: Path, report: Path | None) -> Outcome:
    entries = load_history(state_dir)
    if report is not None:
        docs = [e.doc for e in entries if e.doc is not None]
        if not docs:
            raise InputError(f"No self-test results in {state_dir}.", "Run 'clinic-edge selftest --quick' first.")
        _write_report(report, docs[-1], docs)
    text = history_table(entries)
    if report is not None:
        text += f"\nReport written to {report}"
    return Outcome(data={"state_dir": str(state_dir), "runs": history_rows(entries)}, text=text)


def _write_report(path: Path, run: dict[str, Any], history: list[dict[str, Any]]) -> None:
    try:
        path.write_text(render_report(run, history))
    except OSError as exc:
        raise InputError(f"Cannot write the report to {path}: {exc.strerror or exc}.", "Choose another path.") from exc


def _target(url: str | None, key: str | None, ca: Any, timeout: float) -> Target:
    if not url:
        raise UsageError(
            "No --target given.",
            "Give the gateway's URL (e.g. --target https://clinic-box:8443) or vLLM's (http://127.0.0.1:8000).",
        )
    return Target(url=url, api_key=key, ca_cert=Path(ca) if ca else None, request_timeout_s=timeout)


def _mode(args: argparse.Namespace) -> str:
    single = [f for f in SINGLE_FLAGS if getattr(args, f) is not None]
    if args.quick and single:
        raise UsageError(
            f"--quick cannot be combined with --{single[0].replace('_', '-')}.",
            "Use --quick alone, or ask for one load point with --concurrency, --requests, --prompt-tokens and "
            "--max-tokens.",
        )
    if args.sweep:
        if set(single) - {"requests"}:
            raise UsageError("--sweep takes only --requests (per point) among the load flags.", "Drop the others.")
        return "sweep"
    if single:
        return "single"
    return "quick"


def _profile(args: argparse.Namespace, cfg: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    hardware: dict[str, Any] | None
    try:
        hardware = hardware_snapshot()
    except OSError:
        hardware = None
    profile = _opt(args, cfg, "profile")
    if profile is None:
        profile = "gpu" if hardware and hardware.get("gpus") else "cpu"
    if profile not in PROFILES:
        raise InputError(f"Unknown SLO profile {profile!r}.", f"Use one of: {', '.join(PROFILES)}.")
    return str(profile), hardware


def _run(args: argparse.Namespace, cfg: dict[str, Any], state_dir: Path) -> Outcome:
    mode = _mode(args)
    timeout = float(args.timeout)
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    target = _target(_opt(args, cfg, "target"), key, _opt(args, cfg, "ca_cert"), timeout)
    direct_url = _opt(args, cfg, "direct")
    direct = _target(direct_url, os.environ.get(DIRECT_API_KEY_ENV) or None, None, timeout) if direct_url else None
    keep = int(_opt(args, cfg, "keep", DEFAULT_KEEP))
    if keep < 1:
        raise UsageError("--keep must be at least 1.", "Keep at least the newest run, e.g. --keep 90.")
    check_writable(state_dir)
    profile, hardware = _profile(args, cfg)
    overrides = {k: _opt(args, cfg, k) for k in ("ttft_p99_ms", "image_ttft_ms", "tpot_p99_ms", "e2el_p99_ms")}
    overrides["max_failed"] = _opt(args, cfg, "max_failed")
    overrides["concurrency"] = _opt(args, cfg, "clinic_concurrency")
    slo = slo_for(profile, overrides)
    if slo.concurrency < 1:
        raise UsageError("--clinic-concurrency must be at least 1.", "E.g. --clinic-concurrency 4.")
    progress = Progress(0)
    etc = Path(_opt(args, cfg, "etc_dir", DEFAULT_ETC_DIR))
    plan_doc = read_plan(etc / "vllm" / "plan.json")
    snapshot: dict[str, Any] = {"vllm_flags": read_vllm_flags(etc / "vllm")}
    started = utc_now()
    try:
        outcome = asyncio.run(
            _measure(
                args,
                cfg,
                mode=mode,
                target=target,
                direct=direct,
                slo=slo,
                progress=progress,
                plan_doc=plan_doc,
                snapshot=snapshot,
            )
        )
    except UnreachableError as err:
        # A nightly run that finds the box down must leave a trace the dashboard shows: record a failed run.
        doc = build_result(
            run_id=started.strftime("%Y%m%dT%H%M%SZ"),
            started_at=started,
            finished_at=utc_now(),
            mode=mode,
            target=target.base,
            target_kind="unreachable",
            model=str(_opt(args, cfg, "model") or ""),
            points=[],
            verdict=Verdict(passed=False, reason=f"the target did not answer: {err.message}", slo=slo),
            gateway_share=None,
            plan=plan_doc,
            hardware=hardware,
            snapshot=snapshot | {"error": err.to_dict()},
        )
        err.details["result_file"] = str(save_run(state_dir, doc, keep))
        raise
    info, model, points, share, prompts_exact = outcome
    finished = utc_now()
    verdict = judge(points, slo)
    snapshot |= {
        "model_card": info.card(model),
        "prompt_tokens_exact": prompts_exact,
        "target_readiness": info.readiness,
    }
    doc = build_result(
        run_id=started.strftime("%Y%m%dT%H%M%SZ"),
        started_at=started,
        finished_at=finished,
        mode=mode,
        target=target.base,
        target_kind=info.kind,
        model=model,
        points=points,
        verdict=verdict,
        gateway_share=share,
        plan=plan_doc,
        hardware=hardware,
        snapshot=snapshot,
    )
    path = save_run(state_dir, doc, keep)
    if args.report is not None:
        _write_report(args.report, doc, [e.doc for e in load_history(state_dir) if e.doc is not None])
    data = {**doc, **{k: doc["summary"].get(k) for k in ("ttft_ms", "ttfc_ms", "tpot_ms", "itl_ms", "e2el_ms")}}
    data |= {k: doc["summary"].get(k) for k in ("completed", "failed", "request_throughput", "output_throughput")}
    data["result_file"] = str(path)
    return Outcome(
        data=data, text=_text(doc, path, args.report), exit_code=EXIT_OK if verdict.passed else EXIT_NEGATIVE
    )


async def _measure(
    args: argparse.Namespace,
    cfg: dict[str, Any],
    *,
    mode: str,
    target: Target,
    direct: Target | None,
    slo: Any,
    progress: Progress,
    plan_doc: dict[str, Any] | None,
    snapshot: dict[str, Any],
) -> tuple[TargetInfo, str, list[dict[str, Any]], dict[str, Any] | None, bool]:
    info = await probe_target(target)
    model = _opt(args, cfg, "model") or info.models[0]
    if model not in info.models:
        raise UsageError(
            f"The target does not serve a model named {model!r} (it serves: {', '.join(info.models)}).",
            "Drop --model to use the first one, or give one of those names.",
        )
    card = info.card(model)
    tok_path, tokenizer, how = _tokenizer(
        args, cfg, card=card, plan_doc=plan_doc, info=info, model=model, target=target, direct=direct
    )
    work = Workload(model=model, prompts=PromptMaker(tokenizer), ignore_eos=args.ignore_eos)
    snapshot["ignore_eos"] = work.ignore_eos
    await warm_up(target, work)
    if tokenizer is None:
        await _calibrate(target, work)
    snapshot["prompt_tokenizer"] = how
    with_image = {"yes": True, "no": False}.get(args.image)
    if with_image is None:
        takes = model_takes_images(tok_path)
        with_image = takes if takes is not None else True
    max_len = card.get("max_model_len") if isinstance(card.get("max_model_len"), int) else None
    points: list[LoadPoint]
    if mode == "quick":
        points = plan_quick(slo.concurrency, with_image)
    elif mode == "sweep":
        points = plan_sweep(slo.concurrency, with_image, max_len, requests=args.requests)
    else:
        points = plan_single(
            args.concurrency or 1, args.requests or 16, args.prompt_tokens or 128, args.max_tokens or 32
        )
    progress.total = len(points) + (1 if direct else 0)
    progress.enabled = True
    results = await run_points(target, points, work, progress, slo.goodput_ms())
    if args.image == "auto":
        _skip_image_if_refused(results)
    share = None
    if direct is not None:
        await probe_target(direct)
        share = await gateway_share(target, direct, work, progress)
    return info, model, results, share, work.prompts.exact


def _tokenizer(
    args: argparse.Namespace,
    cfg: dict[str, Any],
    *,
    card: dict[str, Any],
    plan_doc: dict[str, Any] | None,
    info: TargetInfo,
    model: str,
    target: Target,
    direct: Target | None,
) -> tuple[Path | None, Any, str]:
    """The model's tokenizer: loaded here from its directory, else vLLM's own endpoints, else none (calibrated).

    Returns the model directory (if known, for the image check), the tokenizer and how it was obtained.
    """
    candidates = [_opt(args, cfg, "tokenizer"), card.get("root")]
    if plan_doc and isinstance(plan_doc.get("model"), dict):
        candidates.append(plan_doc["model"].get("path"))
    model_dir = next((Path(c) for c in candidates if isinstance(c, str | Path) and Path(c).is_dir()), None)
    if model_dir is not None and (tok := load_tokenizer(model_dir)) is not None:
        return model_dir, tok, "local"
    for t in ([target] if info.kind == "vllm" else []) + ([direct] if direct else []):
        ctx = t.ssl_context()
        remote = RemoteTokenizer(t.base, model, t.headers(), ctx if not isinstance(ctx, bool) else None)
        if remote.works():
            return model_dir, remote, "vllm"
    return model_dir, None, "calibrated"


async def _calibrate(target: Target, work: Workload) -> None:
    """No tokenizer here: learn tokens per word from the server's own prompt_tokens for two prompt lengths."""
    counts = []
    async with make_session(target, 1) as session:
        for words in (16, 256):
            body = chat_request(
                work.model, [{"role": "user", "content": PromptMaker.words(words, words)}], max_tokens=1
            )
            m = measure(await stream_chat(session, target, body))
            counts.append((words, m.prompt_tokens or 0))
    work.prompts.calibrate(counts[0], counts[1])


# How vLLM refuses an image for a text-only model ("... is not a multimodal model", "At most 0 image(s) ...").
TEXT_ONLY_MARKERS = ("multimodal", "multi-modal", "at most 0 image")


def _skip_image_if_refused(points: list[dict[str, Any]]) -> None:
    """vLLM refusing the image because the model is text-only means "no image support", not a failure.

    Any other refusal (the gateway's image checks, a size limit) stays a failure.
    """
    for p in points:
        errors = p.get("errors") or {}
        if (
            p.get("kind") == "image"
            and not p.get("completed")
            and errors
            and all(e.startswith("HTTP 400") and any(m in e.lower() for m in TEXT_ONLY_MARKERS) for e in errors)
        ):
            p["skipped"] = "the model does not take images (vLLM refused the image as text-only)"
            p["failed"] = 0


def _text(doc: dict[str, Any], path: Path, report: Path | None) -> str:
    v = doc["verdict"]
    lines = [
        f"Self-test ({doc['mode']}) of {doc['target']} ({doc['target_kind']}), model {doc['model']}:",
        "",
        f"  {'point':<36} {'ok/fail':>8} {'TTFT p50':>9} {'p99':>8} {'TTFC p50':>9} {'TPOT p50':>9} {'tok/s':>8}",
    ]
    for p in doc["points"]:
        t, c, o = p["ttft_ms"], p["ttfc_ms"], p["tpot_ms"]
        name = ("* " if p.get("judged") else "  ") + p["name"]
        if p.get("skipped"):
            lines.append(f"  {name:<36} skipped: {p['skipped']}")
            continue
        lines.append(
            f"  {name:<36} {p['completed']:>4}/{p['failed']:<3} {_f(t['p50']):>9} {_f(t['p99']):>8} "
            f"{_f(c['p50']):>9} {_f(o['p50']):>9} {_f(p['output_throughput']):>8}"
        )
    lines.append("  (* judged; times in ms)")
    if doc.get("gateway_share_ms") is not None:
        lines.append(f"\nGateway's share of TTFT p50: {doc['gateway_share_ms']:.2f} ms")
    lines += ["", ("PASS" if v["passed"] else "FAIL") + f" — {v['reason'].split(': ', 1)[-1]}", f"Saved {path}"]
    if report is not None:
        lines.append(f"Report written to {report}")
    return "\n".join(lines)


def _f(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, int | float) else "–"
