"""vLLM's command line and the environment files the ``clinic-edge-vllm@<i>`` units read — one source of truth.

``DIR/vllm-<i>.env`` per replica (0-based) holds ``CLINIC_EDGE_VLLM_ARGS`` (every argument after
``python -m vllm.entrypoints.openai.api_server``), ``CUDA_VISIBLE_DEVICES`` (GPU profiles) and the environment vLLM
needs; ``DIR/plan.json`` is the ``--json`` document. The unit runs ``... api_server $CLINIC_EDGE_VLLM_ARGS``: systemd
splits that on whitespace and does no quote processing inside a word, so **no single argument may contain spaces,
quotes, backslashes or ``$``** — :func:`vllm_args` refuses such values (a model path with a space, say) instead of
writing a file that would start vLLM with the wrong arguments.

Files are written atomically (temporary file, fsync, rename) and only when their content changes, so an unchanged
plan leaves their modification times alone and the installer does not restart vLLM. Env files of replicas that the
new plan no longer has are removed.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from appliance.atomic import atomic_write_text
from appliance.errors import InputError
from appliance.planner.plan import Plan
from appliance.vllm_server import CPU_PROFILE, SERVING_ENV, CpuProfile, api_server_args

__all__ = ["BASE_PORT", "cpu_profile", "render_env_file", "replica_env", "vllm_args", "write_env_dir"]

BASE_PORT = 8000
SAFE_WORD = re.compile(r"^[A-Za-z0-9_./:=,@+%-]+$")
ENV_NAME = re.compile(r"^vllm-(\d+)\.env$")
HEADER = (
    "# Written by 'clinic-edge plan --write-env'; do not edit: run the planner again (it rewrites this file only\n"
    "# when the plan changes). CLINIC_EDGE_VLLM_ARGS is split on spaces by systemd: no argument contains one.\n"
)


def _word(value: str, what: str) -> str:
    if not SAFE_WORD.match(value):
        raise InputError(
            f"The {what} {value!r} contains a space, quote or other character that the systemd unit cannot pass to "
            "vLLM as one argument.",
            "Move the model to a path made of letters, digits and - _ . / only, and use such a --served-model-name.",
        )
    return value


def vllm_args(plan: Plan, replica: int = 0) -> list[str]:
    """Every argument after ``python -m vllm.entrypoints.openai.api_server`` for ``replica``."""
    return api_server_args(
        model=_word(str(plan.serve_path.resolve()), "model path"),
        served_model_name=_word(plan.served_model_name, "served model name"),
        host="127.0.0.1",
        port=BASE_PORT + replica,
        engine_args=_engine_args(plan),
    )


def cpu_profile(plan: Plan) -> CpuProfile:
    """The CPU build's profile with the context length and KV cache the planner chose."""
    kv_gib = plan.cpu_kv_gib if plan.cpu_kv_gib is not None else CPU_PROFILE.kv_cache_gib
    return dataclasses.replace(CPU_PROFILE, max_model_len=plan.max_model_len, kv_cache_gib=kv_gib)


def _engine_args(plan: Plan) -> list[str]:
    k = plan.knobs
    if plan.hardware.kind == "cpu":
        args = cpu_profile(plan).argv()
    else:
        args = ["--max-model-len", str(plan.max_model_len)]
        # The budget's utilization: on unified memory sized to what the engine takes (appliance/planner/unified.py).
        args += ["--gpu-memory-utilization", f"{plan.budget.utilization:g}"]
        if plan.tp > 1:
            args += ["--tensor-parallel-size", str(plan.tp)]
        if plan.kv_cache_memory_bytes:
            args += ["--kv-cache-memory-bytes", str(plan.kv_cache_memory_bytes)]
        if k.enforce_eager:
            args.append("--enforce-eager")
    if k.block_size:
        args += ["--block-size", str(k.block_size)]
    if k.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", _word(k.kv_cache_dtype, "KV cache dtype")]
    if k.max_num_batched_tokens:
        args += ["--max-num-batched-tokens", str(k.max_num_batched_tokens)]
    if k.max_num_seqs:
        args += ["--max-num-seqs", str(k.max_num_seqs)]
    if plan.facts.vision is not None:
        args.append(f"--limit-mm-per-prompt.image={plan.images_per_request}")
    return args


def replica_env(plan: Plan, replica: int) -> dict[str, str]:
    """The environment of one replica's unit, ``CLINIC_EDGE_VLLM_ARGS`` included."""
    env: dict[str, str] = {"CLINIC_EDGE_VLLM_ARGS": " ".join(vllm_args(plan, replica))}
    if plan.hardware.kind == "cpu":
        env.update(cpu_profile(plan).env())
    else:
        first = replica * plan.tp
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(first, first + plan.tp))
        env.update(SERVING_ENV)
        if plan.hardware.unified:
            # Unified memory: let the allocator grow segments instead of reserving fragments of the shared pool.
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return env


def render_env_file(env: dict[str, str]) -> str:
    """systemd EnvironmentFile text (values are plain words separated by single spaces; no quoting needed)."""
    return HEADER + "".join(f"{key}={value}\n" for key, value in env.items())


def _write_if_changed(path: Path, text: str) -> bool:
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    atomic_write_text(path, text, mode=0o644)
    return True


def write_env_dir(plan: Plan, directory: Path, plan_json: str) -> dict[str, list[str]]:
    """Write ``vllm-<i>.env`` per replica and ``plan.json``; return the files written, kept and removed."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"Cannot create {directory}: {exc.strerror or exc}.", "Run as root or choose a writable --write-env DIR."
        ) from exc
    report: dict[str, list[str]] = {"written": [], "unchanged": [], "removed": []}
    wanted = {f"vllm-{i}.env": render_env_file(replica_env(plan, i)) for i in range(plan.replicas)}
    wanted["plan.json"] = plan_json
    try:
        for name, text in wanted.items():
            changed = _write_if_changed(directory / name, text)
            report["written" if changed else "unchanged"].append(str(directory / name))
        for stale in sorted(directory.iterdir()):
            m = ENV_NAME.match(stale.name)
            if m and int(m.group(1)) >= plan.replicas:
                stale.unlink()
                report["removed"].append(str(stale))
    except OSError as exc:
        raise InputError(
            f"Cannot write the environment files in {directory}: {exc.strerror or exc}.",
            "Run as root or choose a writable --write-env DIR; nothing half-written was left behind.",
        ) from exc
    return report
