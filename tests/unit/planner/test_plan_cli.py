"""``clinic-edge plan`` end to end: verdicts, topology, unified memory, env files, and bad input."""

from __future__ import annotations

import json
import os
import shlex
import types
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import main
from appliance.planner.accounting import Knobs
from appliance.planner.hardware_profile import GIB, detect
from appliance.planner.plan import PlanInputs, make_plan
from tests.unit.planner.ground_truth import FIXTURES
from tests.unit.planner.test_safetensors_header import write_safetensors
from tests.unit.test_hardware import NVMLErrorNotSupported, fake_nvml, meminfo

REQUIRED_KEYS = {
    "weights_gib",
    "activation_gib",
    "non_torch_gib",
    "cudagraph_gib",
    "kv_cache_gib",
    "kv_cache_tokens",
    "max_concurrency",
    "max_model_len",
    "verdict",
    "reasons",
    "suggestions",
    "topology",
    "vllm_args",
}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    code = main(["plan", *argv, "--json"])
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "Traceback" not in out.out
    return code, json.loads(out.out), out.err


def cfg(name: str) -> str:
    return str(FIXTURES / f"{name}.json")


def test_json_document_has_the_contract_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = run(
        capsys,
        cfg("Llama-3.1-8B-Instruct"),
        "--hardware",
        "h100",
        "--weights-gib",
        "14.99",
        "--max-model-len",
        "16000",
        "--concurrency",
        "8",
    )
    assert code == 0 and doc.keys() >= REQUIRED_KEYS
    assert doc["verdict"] == "fits" and doc["topology"] == {"replicas": 1, "tp": 1, "gpus": 1}
    assert doc["max_concurrency"] >= 8 and doc["kv_cache_tokens"] > 8 * 16000
    args = doc["vllm_args"]
    assert args[:2] == ["--model", str(FIXTURES)] and "--gpu-memory-utilization" in args
    assert args[args.index("--port") + 1] == "8000" and args[args.index("--max-model-len") + 1] == "16000"


def test_text_table_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", cfg("Qwen3-8B"), "--hardware", "h200", "--weights-gib", "15.3"])
    out = capsys.readouterr().out
    assert code == 0
    for text in (
        "× gpu-memory-utilization 0.92",
        "− weights",
        "= KV cache",
        "verdict: fits",
        "python -m vllm.entrypoints.openai.api_server --model",
    ):
        assert text in out


def test_replicas_when_the_model_fits_one_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = run(
        capsys,
        cfg("Llama-3.1-8B-Instruct"),
        "--hardware",
        "h100",
        "--gpus",
        "2",
        "--weights-gib",
        "14.99",
        "--max-model-len",
        "32768",
        "--concurrency",
        "6",
    )
    assert code == 0 and doc["topology"] == {"replicas": 2, "tp": 1, "gpus": 2}
    assert doc["sessions_per_replica"] == 3
    ports = [r["port"] for r in doc["replicas"]]
    assert ports == [8000, 8001] and [r["cuda_visible_devices"] for r in doc["replicas"]] == ["0", "1"]


def test_smallest_tp_when_one_gpu_is_too_small(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = run(
        capsys,
        cfg("Llama-3.1-70B-Instruct"),
        "--hardware",
        "h100",
        "--gpus",
        "8",
        "--weights-gib",
        "131.4",
        "--max-model-len",
        "131072",
    )
    assert code == 0 and doc["verdict"] == "fits"
    assert doc["topology"] == {"replicas": 2, "tp": 4, "gpus": 8}
    assert [r["cuda_visible_devices"] for r in doc["replicas"]] == ["0,1,2,3", "4,5,6,7"]
    assert "--tensor-parallel-size" in doc["vllm_args"]


def test_does_not_fit_says_what_would(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = run(
        capsys,
        cfg("Llama-3.1-70B-Instruct"),
        "--hardware",
        "h100",
        "--weights-gib",
        "131.4",
        "--max-model-len",
        "16000",
    )
    assert code == 1 and doc["verdict"] == "does-not-fit"
    text = " ".join(doc["suggestions"])
    assert "4-bit" in text and "4 such GPUs with --tp 4" in text  # bf16 70B: TP 2 leaves no KV room at 0.92


def test_fits_reduced_lowers_max_model_len_in_the_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = run(
        capsys, cfg("gemma-3-27b-it"), "--hardware", "h100", "--weights-gib", "51.4", "--concurrency", "8"
    )
    assert code == 0 and doc["verdict"] == "fits-reduced"
    reduced = doc["max_model_len"]
    assert 256 < reduced < 131072 and doc["max_concurrency"] >= 8
    assert doc["vllm_args"][doc["vllm_args"].index("--max-model-len") + 1] == str(reduced)
    assert any("--kv-cache-dtype fp8" in s or str(reduced) in s for s in doc["suggestions"])


def test_dgx_spark_pins_the_kv_cache_and_keeps_the_reserve(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = run(
        capsys,
        cfg("gemma-3-27b-it"),
        "--hardware",
        "dgx-spark",
        "--weights-gib",
        "51.4",
        "--max-model-len",
        "32768",
        "--concurrency",
        "4",
    )
    assert code == 0 and doc["verdict"] == "fits"
    assert doc["gpu_memory_utilization"] <= 0.85 and doc["unified_reserve_gib"] == 8.0
    args = doc["vllm_args"]
    pinned = int(args[args.index("--kv-cache-memory-bytes") + 1])
    assert pinned == doc["kv_cache_memory_bytes"] and abs(pinned - doc["kv_cache_bytes"]) < 1024 * 1024
    assert doc["replicas"][0]["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_vllm_default_utilization_fails_on_spark(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = run(
        capsys, cfg("Qwen3-8B"), "--hardware", "dgx-spark", "--weights-gib", "15.3", "--gpu-memory-utilization", "0.92"
    )
    assert code == 1 and any("Free memory on device" in r for r in doc["reasons"])


def test_gb10_detection_through_nvml_not_supported(tmp_path: Path) -> None:
    dev = {
        "name": "NVIDIA GB10",
        "uuid": "GPU-x",
        "memory": NVMLErrorNotSupported(),
        "procs": [],
        "gprocs": [],
        "util": types.SimpleNamespace(gpu=0, memory=0),
    }
    hw = detect(nvml=fake_nvml([dev]), meminfo=meminfo(tmp_path, 125_000_000, 115_000_000))
    assert hw.unified and hw.gpus == 1 and abs(hw.total_gib - 125_000_000 / 1024**2) < 1e-6
    plan = make_plan(
        PlanInputs(model=FIXTURES / "Qwen3-8B.json", hardware=hw, knobs=Knobs(), weights_gib=15.3, max_model_len=32768)
    )
    expected = int(min(0.85, (hw.available_gib - 8.0) / hw.total_gib) * 100) / 100  # type: ignore[operator]
    assert plan.knobs.gpu_memory_utilization == expected and plan.kv_cache_memory_bytes


def test_h100_detection_lowers_nvml_total_to_cuda(tmp_path: Path) -> None:
    dev = {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-1",
        "memory": types.SimpleNamespace(total=85520809984, used=600 * 1024**2, free=0),
        "procs": [],
        "gprocs": [],
        "util": types.SimpleNamespace(gpu=0, memory=0),
    }
    hw = detect(nvml=fake_nvml([dev, dev]), meminfo=meminfo(tmp_path, 2 * 1024**3, 1024**3))
    assert hw.gpus == 2 and not hw.unified and 79.0 < hw.total_gib < 79.2 and hw.big_gpu


def _parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (no quotes are written, so none to strip)."""
    env = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def test_write_env_dir_is_atomic_idempotent_and_prunes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "vllm"
    base = [
        cfg("Llama-3.1-8B-Instruct"),
        "--hardware",
        "h100",
        "--weights-gib",
        "14.99",
        "--max-model-len",
        "16000",
        "--write-env",
        str(out),
        "--served-model-name",
        "clinic-reader",
    ]
    code, doc, _ = run(capsys, *base, "--gpus", "2")
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["plan.json", "vllm-0.env", "vllm-1.env"]
    env1 = _parse_env_file(out / "vllm-1.env")
    assert env1["CUDA_VISIBLE_DEVICES"] == "1" and env1["HF_HUB_OFFLINE"] == "1"
    # ExecStart's $CLINIC_EDGE_VLLM_ARGS is split on whitespace: the words are exactly vLLM's arguments.
    assert env1["CLINIC_EDGE_VLLM_ARGS"].split() == doc["replicas"][1]["vllm_args"]
    assert shlex.split(env1["CLINIC_EDGE_VLLM_ARGS"]) == env1["CLINIC_EDGE_VLLM_ARGS"].split()
    assert "--served-model-name clinic-reader" in env1["CLINIC_EDGE_VLLM_ARGS"]
    plan_json = json.loads((out / "plan.json").read_text())
    assert plan_json["verdict"] == "fits" and plan_json["topology"]["replicas"] == 2
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    os.utime(out / "vllm-0.env", ns=(1, 1))  # an unchanged file must not even be rewritten
    code, doc, _ = run(capsys, *base, "--gpus", "2")
    assert code == 0 and doc["write_env"]["written"] == []
    assert (out / "vllm-0.env").stat().st_mtime_ns == 1
    assert (out / "vllm-1.env").stat().st_mtime_ns == mtimes["vllm-1.env"]
    code, doc, _ = run(capsys, *base, "--gpus", "1")
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["plan.json", "vllm-0.env"]
    assert doc["write_env"]["removed"] == [str(out / "vllm-1.env")]
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_cpu_profile_env_reuses_the_cpu_constants(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text((FIXTURES / "Qwen3-0.6B.json").read_text())
    write_safetensors(model / "model.safetensors", {"w": ("BF16", [1024, 1024])})
    code, doc, _ = run(
        capsys, str(model), "--hardware", "cpu", "--kv-cache-gib", "2", "--write-env", str(tmp_path / "env")
    )
    assert code == 0 and doc["topology"]["replicas"] == 1
    env = _parse_env_file(tmp_path / "env" / "vllm-0.env")
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and "CUDA_VISIBLE_DEVICES" not in env
    assert "--enforce-eager" in env["CLINIC_EDGE_VLLM_ARGS"].split()
    assert doc["kv_cache_gib"] == 2.0 and doc["kv_cache_tokens"] == 2 * GIB // (28 * 2 * 128 * 8 * 2 * 128) * 128


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{missing}"], "does not exist"),
        (["{badjson}", "--hardware", "h100", "--weights-gib", "1"], "not valid JSON"),
        (["{noffn}", "--hardware", "h100"], "lacks intermediate_size, so the weights cannot be estimated"),
        (["{quant}", "--hardware", "h100"], "the method 'bitsandbytes'"),
        (["{truncated}", "--hardware", "h100"], "truncated"),
        (["{bare}", "--hardware", "h100", "--gpu-mem-gib", "80", "--weights-gib", "1"], "both describe the GPU"),
        (["{bare}", "--unified-memory", "--weights-gib", "1"], "--unified-memory needs --gpu-mem-gib"),
        (["{bare}", "--hardware", "h100", "--gpus", "4", "--tp", "3", "--weights-gib", "1"], "does not divide"),
        (["{bare}", "--hardware", "h100", "--tp", "2", "--weights-gib", "1"], "--tp 2 with 1 GPU"),
        (["{bare}", "--hardware", "h100", "--max-model-len", "200000", "--weights-gib", "1"], "max_position"),
        (["{bare}", "--hardware", "h100", "--images-per-request", "2", "--weights-gib", "1"], "no vision tower"),
        (["{bare}", "--hardware", "h100", "--reserve-gib", "4", "--weights-gib", "1"], "unified memory only"),
        (["{bare}", "--hardware", "h100", "--gpu-memory-utilization", "1.5", "--weights-gib", "1"], "above 1"),
        (["{bare}", "--hardware", "cpu", "--gpus", "2", "--weights-gib", "1"], "--gpus with --hardware cpu"),
        (["{bare}", "--hardware", "h100", "--vllm-version", "latest", "--weights-gib", "1"], "not a version"),
        (["{unknown}", "--hardware", "h100", "--weights-gib", "1"], "lacks num_attention_heads"),
        (["{spaced}", "--hardware", "h100"], "cannot pass to vLLM as one argument"),
    ],
)
def test_bad_input_is_one_clear_paragraph_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str
) -> None:
    (tmp_path / "bad.json").write_text("{oops")
    bare = tmp_path / "bare" / "config.json"
    bare.parent.mkdir()
    bare.write_text((FIXTURES / "Llama-3.1-8B-Instruct.json").read_text())
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_text(bare.read_text())
    write_safetensors(trunc / "model.safetensors", {"w": ("BF16", [64, 64])}, cut=10)
    (tmp_path / "unknown.json").write_text(
        json.dumps({"architectures": ["X"], "num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 10})
    )
    doc = json.loads(bare.read_text())
    (tmp_path / "noffn.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "intermediate_size"}))
    (tmp_path / "quant.json").write_text(json.dumps({**doc, "quantization_config": {"quant_method": "bitsandbytes"}}))
    spaced = tmp_path / "my model"
    spaced.mkdir()
    (spaced / "config.json").write_text(bare.read_text())
    write_safetensors(spaced / "model.safetensors", {"w": ("BF16", [64, 64])})
    paths = {
        "missing": str(tmp_path / "nope"),
        "badjson": str(tmp_path / "bad.json"),
        "bare": str(bare),
        "truncated": str(trunc),
        "unknown": str(tmp_path / "unknown.json"),
        "noffn": str(tmp_path / "noffn.json"),
        "quant": str(tmp_path / "quant.json"),
        "spaced": str(spaced),
    }
    code = main(["plan", *[a.format(**paths) for a in argv]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "what to do:" in err and "Traceback" not in err
    code = main(["plan", *[a.format(**paths) for a in argv], "--json"])
    out = capsys.readouterr().out
    assert code == 2 and json.loads(out)["error"]["message"]


def test_write_env_keeps_the_last_good_files_when_nothing_fits(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "vllm"
    good = [cfg("Llama-3.1-8B-Instruct"), "--hardware", "h100", "--max-model-len", "16000", "--write-env", str(out)]
    assert run(capsys, *good, "--weights-gib", "14.99")[0] == 0
    before = (out / "vllm-0.env").read_text()
    code, doc, _ = run(capsys, *good, "--weights-gib", "90")
    assert code == 1 and "skipped" in doc["write_env"]
    assert (out / "vllm-0.env").read_text() == before


def test_auto_without_a_driver_says_it_fell_back_to_cpu(tmp_path: Path) -> None:
    nvml = fake_nvml([], init_error=RuntimeError("NVML Shared Library Not Found"))
    hw = detect(nvml=nvml, meminfo=meminfo(tmp_path, 8 * 1024**2, 6 * 1024**2))
    assert hw.kind == "cpu" and hw.detected and "NVML Shared Library Not Found" in hw.note


def test_unified_reserve_is_a_hard_limit(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = run(
        capsys, cfg("Qwen3-8B"), "--hardware", "dgx-spark", "--weights-gib", "15.3", "--gpu-memory-utilization", "0.9"
    )
    assert code == 1 and any("8 GiB reserve" in r and "--gpu-memory-utilization 0.84" in r for r in doc["reasons"])
    code, doc, _ = run(
        capsys,
        cfg("Qwen3-8B"),
        "--hardware",
        "dgx-spark",
        "--weights-gib",
        "15.3",
        "--gpu-memory-utilization",
        "0.9",
        "--reserve-gib",
        "1",
    )
    assert code == 0 and doc["verdict"] == "fits"


def test_vision_model_passes_the_image_limit_and_checks_image_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = run(
        capsys,
        cfg("Qwen2.5-VL-7B-Instruct"),
        "--hardware",
        "dgx-spark",
        "--weights-gib",
        "15.45",
        "--images-per-request",
        "2",
        "--max-model-len",
        "65536",
        "--concurrency",
        "2",
    )
    assert code == 0 and doc["verdict"] == "fits" and "--limit-mm-per-prompt.image=2" in doc["vllm_args"]
    assert doc["kv_layout"]["groups"] == [{"kind": "full", "window": None, "layers": 28, "block_size": 16}]
    code = main(
        [
            "plan",
            cfg("Qwen2.5-VL-7B-Instruct"),
            "--hardware",
            "h100",
            "--weights-gib",
            "15.45",
            "--images-per-request",
            "2",
            "--max-model-len",
            "16384",
        ]
    )
    assert code == 2 and "image(s) per request take 32768 tokens" in capsys.readouterr().err
