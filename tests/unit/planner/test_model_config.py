"""Reading real models' configs: nesting, transformers defaults, hybrid layers, MLA, and what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.errors import InputError
from appliance.planner.accounting import Knobs, kv_layout
from appliance.planner.model_config import load_model_facts, model_facts_from_config
from tests.unit.planner.ground_truth import FIXTURES


def facts(name: str):  # type: ignore[no-untyped-def]
    return load_model_facts(FIXTURES / f"{name}.json")[0]


def test_gemma3_27b_hybrid_groups_and_omitted_defaults() -> None:
    f = facts("gemma-3-27b-it")
    assert (f.vocab_size, f.max_position_embeddings, f.head_dim) == (262208, 131072, 128)
    kinds = [layer.kind for layer in f.layers]
    assert kinds.count("sliding") == 52 and kinds.count("full") == 10
    assert [i for i, k in enumerate(kinds) if k == "full"] == list(range(5, 62, 6))
    layout = kv_layout(f, 1, Knobs())
    # vLLM: 1 full + 6 sliding groups of 10 layers, "Add 8 padding layers".
    assert layout.group_size == 10 and len(layout.groups) == 7 and layout.padding_layers == 8
    assert sum(g.kind == "full" for g in layout.groups) == 1
    assert layout.page_bytes == 2 * 16 * 16 * 128 * 2
    assert any("vocab_size not in config" in n for n in f.notes)


def test_qwen25_vl_sliding_window_is_disabled_full_attention() -> None:
    f = facts("Qwen2.5-VL-7B-Instruct")
    assert all(layer.kind == "full" for layer in f.layers)
    assert f.num_kv_heads == 4 and f.head_dim == 128 and f.vision is not None
    assert len(kv_layout(f, 1, Knobs()).groups) == 1


def test_text_config_nesting_qwen3_vl_and_mistral3() -> None:
    q = facts("Qwen3-VL-4B-Instruct")
    assert (q.num_layers, q.num_kv_heads, q.head_dim, q.vocab_size) == (36, 8, 128, 151936)
    m = facts("Mistral-Small-3.1-24B-Instruct-2503")
    assert m.head_dim == 128 and m.hidden_size // m.num_attention_heads == 160  # head_dim is explicit, not derived
    assert all(layer.kind == "full" for layer in m.layers)  # "sliding_window": null


def test_gpt_oss_layer_types_and_mla() -> None:
    g = facts("gpt-oss-20b")
    layout = kv_layout(g, 1, Knobs())
    assert [x.kind for x in layout.groups] == ["sliding", "full"] and layout.group_size == 12
    d = facts("DeepSeek-V2-Lite")
    assert d.mla_latent_dim == 576
    mla = kv_layout(d, 4, Knobs())
    assert mla.block_size == 64 and mla.page_bytes == 64 * 576 * 2  # no ×2, not split by TP


def test_unknown_architecture_plans_from_layers_and_heads(tmp_path: Path) -> None:
    cfg = {
        "architectures": ["FancyNewForCausalLM"],
        "model_type": "fancy",
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "hidden_size": 512,
        "vocab_size": 1000,
    }
    f = model_facts_from_config(cfg, "fancy")
    assert f.head_dim == 64 and f.num_kv_heads == 8 and f.architecture == "FancyNewForCausalLM"


def test_missing_fields_are_named(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        model_facts_from_config({"architectures": ["Mystery"], "hidden_size": 64}, "m")
    assert "num_hidden_layers" in err.value.message and "num_attention_heads" in err.value.message
    assert err.value.details["missing"] == ["num_hidden_layers", "num_attention_heads"]


def test_unreadable_or_malformed_config(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"has no config\.json"):
        load_model_facts(tmp_path)
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_model_facts(tmp_path)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(InputError, match="not a JSON object"):
        load_model_facts(bad)
    with pytest.raises(InputError, match="does not exist"):
        load_model_facts(tmp_path / "nope.json")
