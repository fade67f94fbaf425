"""Checks on the data tables: tables/models/*.json, tables/models/aliases.csv, tables/gpus.csv.

The model checks build every preset on the meta device (no weights are allocated) and
compare the parameter count with the released checkpoint's exact count.
"""
import csv
import json
from pathlib import Path

import pytest

TABLES = Path(__file__).resolve().parents[1] / "tables"
MODELS = TABLES / "models"

PRESETS = [
    "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b",
    "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b",
    "mistral-7b", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b",
    "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b",
    "qwen3-8b", "qwen3-14b", "qwen3-32b", "gemma-2-2b", "gemma-2-9b", "gemma-2-27b",
    "phi-3-mini", "tinyllama-1.1b", "yi-34b", "qwen3-30b-a3b", "mixtral-8x7b", "tiny",
]

# Meta-device counts (tied embeddings once) pinned for presets whose published_params is null.
PINNED_COUNTS = {"qwen3-1.7b": 1_720_574_976, "tiny": 3_950_848}

# Spot values of well-known released checkpoints, independent of the JSON files.
KNOWN = {
    "llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "llama-3.1-8b": 8_030_261_248,
    "mistral-7b": 7_248_023_552, "qwen2.5-7b": 7_615_616_512, "llama-3.1-405b": 405_853_388_800,
    "mixtral-8x7b": 46_702_792_704,
}

GPUS = ["h100-80gb", "h200-141gb", "h20-96gb", "a100-40gb", "a100-80gb", "a800-80gb", "a10g-24gb",
        "l40s-48gb", "l20-48gb", "a6000-48gb", "rtx4090-24gb", "rtx3090-24gb", "v100-32gb"]
GPU_COLUMNS = ("name,vendor_name,memory_gib,memory_bytes,bf16_dense_tflops,fp16_dense_tflops,"
               "fp8_dense_tflops,hbm_bandwidth_gbps,intra_node_link,intra_node_bandwidth_gbps,"
               "inter_node_bandwidth_gbps,pcie_gen,pcie_bandwidth_gbps,supports_flash_attn,source").split(",")


def load(preset):
    return json.loads((MODELS / f"{preset}.json").read_text())


def test_preset_files_are_exactly_the_list():
    assert sorted(p.stem for p in MODELS.glob("*.json")) == sorted(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_tuneplan_block(preset):
    meta = load(preset)["_tuneplan"]
    assert {"hf_id", "source", "published_params"} <= set(meta)
    assert meta["source"]
    pub = meta["published_params"]
    assert pub is None or (isinstance(pub, int) and pub > 0)
    if preset == "tiny":
        assert meta["hf_id"] is None
    else:
        assert "/" in meta["hf_id"] and meta["hf_id"] in meta["source"]
    if pub is None and preset != "tiny":
        assert meta.get("note"), "a null published_params must say why"


def test_tiny_shape():
    d = load("tiny")
    want = dict(model_type="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=688, vocab_size=2048,
                max_position_embeddings=2048, tie_word_embeddings=False)
    assert {k: d[k] for k in want} == want


@pytest.mark.parametrize("preset", PRESETS)
def test_meta_param_count(preset):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = load(preset)
    cfg = transformers.AutoConfig.for_model(**d)  # the _tuneplan key is accepted as-is
    assert cfg.model_type == d["model_type"]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert type(model).__name__ == d["architectures"][0]
    n = sum(p.numel() for p in model.parameters())
    pub = d["_tuneplan"]["published_params"]
    expected = pub if pub is not None else PINNED_COUNTS[preset]
    assert n == expected, f"{preset}: meta count {n:,} != {expected:,}"
    if preset in KNOWN:
        assert n == KNOWN[preset]


def test_aliases():
    with open(MODELS / "aliases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["alias", "preset", "why"]
    aliases = {r["alias"]: r["preset"] for r in rows}
    assert len(aliases) == len(rows), "duplicate alias"
    assert set(aliases) == {"1b", "3b", "7b", "8b", "13b", "14b", "32b", "34b", "70b", "72b", "405b"}
    for r in rows:
        assert (MODELS / f"{r['preset']}.json").is_file(), r
        assert r["why"].strip()
    assert aliases["7b"] == "llama-2-7b" and aliases["8b"] == "llama-3.1-8b"


def test_gpus_csv():
    with open(TABLES / "gpus.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == GPU_COLUMNS
        rows = {r["name"]: r for r in reader}
    assert sorted(rows) == sorted(GPUS)
    for name, r in rows.items():
        b = int(r["memory_bytes"])
        assert b % (1 << 20) == 0
        assert abs(float(r["memory_gib"]) - b / 2**30) < 0.006, name
        assert float(r["fp16_dense_tflops"]) > 0 and float(r["hbm_bandwidth_gbps"]) > 0
        for col in ("intra_node_bandwidth_gbps", "inter_node_bandwidth_gbps", "pcie_bandwidth_gbps"):
            assert float(r[col]) > 0, (name, col)
        assert int(r["pcie_gen"]) in (3, 4, 5)
        assert r["supports_flash_attn"] in ("true", "false")
        assert r["source"].strip()
    assert rows["h100-80gb"]["memory_bytes"] == "85520809984"
    assert float(rows["h100-80gb"]["intra_node_bandwidth_gbps"]) == 450
    assert float(rows["a800-80gb"]["intra_node_bandwidth_gbps"]) == 200
    for ampere_or_older in ("a100-40gb", "a100-80gb", "a800-80gb", "a10g-24gb", "a6000-48gb",
                            "rtx3090-24gb", "v100-32gb"):
        assert rows[ampere_or_older]["fp8_dense_tflops"] == ""
    assert rows["v100-32gb"]["supports_flash_attn"] == "false"
    assert rows["v100-32gb"]["bf16_dense_tflops"] == ""
