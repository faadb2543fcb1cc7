"""Published MoE models: counts rebuilt from hyper-parameters must match what the authors published."""
import json

import pytest

from moe_core.model import published
from moe_core.model.published import PARTS, active_as_published, compute, memory_bytes, published_models, spec

REQUIRED = ("mixtral-8x7b", "deepseek-v3", "qwen3-235b-a22b", "olmoe-1b-7b",
            "gpt-oss-120b", "switch-c-2048", "glam-1.2t", "llama-4-maverick")


def rel(a, b):
    return abs(a / b - 1)


def test_every_required_model_is_listed():
    assert set(REQUIRED) <= set(published_models())
    assert len(published_models()) == len(set(published_models()))


# ----------------------------------------------------------------------------- published figures

@pytest.mark.parametrize("name", ["mixtral-8x7b", "deepseek-v3", "qwen3-235b-a22b", "olmoe-1b-7b"])
def test_total_and_active_within_3_percent_of_published(name):
    c = compute(name)
    assert rel(c.total, c.published_total) < 0.03, (c.total, c.published_total)
    assert rel(c.active_per_token, c.published_active_per_token) < 0.03, (c.active_per_token, c.published_active_per_token)


def test_llama_4_maverick_text_model_matches_400b_17b():
    # Meta's 400B / 17B are the text model with both embedding tables; the vision tower is not counted
    c = compute("llama-4-maverick")
    assert rel(c.total, 400e9) < 0.01 and rel(c.active_per_token, 17e9) < 0.015
    assert c.n_moe_layers == 24 and c.by_part["dense_ffn"] == 24 * 3 * 5120 * 16384


def test_gpt_oss_matches_the_model_card_once_the_input_embedding_is_left_out():
    c = compute("gpt-oss-120b")
    assert rel(c.total, 116.83e9) < 0.001
    # OpenAI counts the unembedding as active but not the embedding lookup
    embedding = 201088 * 2880
    assert active_as_published("gpt-oss-120b") == c.active_per_token - embedding
    assert rel(active_as_published("gpt-oss-120b"), 5.13e9) < 0.002
    assert rel(c.active_per_token, 5.13e9) > 0.10            # by our convention (lookup included) it is 5.71B
    # the model card's own breakdown: attention 0.96B, embed + unembed 1.16B, MLP 114.71B
    assert rel(c.by_part["attention"], 0.96e9) < 0.005
    assert rel(c.by_part["embeddings"], 1.16e9) < 0.005
    mlp = c.by_part["routed_experts"] + c.by_part["router"] + 36 * 2880   # + the MLP block's pre-norm
    assert rel(mlp, 114.71e9) < 0.001


def test_glam_reproduces_96_6b_active_and_rounds_to_1_2t():
    c = compute("glam-1.2t")
    assert rel(c.active_per_token, 96.6e9) < 0.001
    # the paper's "1.2T" is 1.162T rounded to two significant figures
    assert round(c.total / 1e11) == 12 and rel(c.total, 1.162e12) < 0.001


def test_switch_c_total_is_both_stacks_and_no_active_count_was_published():
    c = compute("switch-c-2048")
    assert rel(c.total, 1571e9) < 0.001                     # Table 9: 1571B, encoder + decoder
    assert round(memory_bytes(c.total, "bf16") / 1e12, 1) == 3.1   # HF card: "1.6T parameters for 3.1 TB"
    assert c.published_active_per_token is None and active_as_published("switch-c-2048") == c.active_per_token
    assert c.n_layer == c.n_moe_layers == 30 and c.top_k == 1
    # decoder blocks carry a cross-attention: 15 x 1 + 15 x 2 attention modules of 4 x 2080 x 1920
    assert c.by_part["attention"] == 45 * 4 * 2080 * 1920


def test_deepseek_v3_first_three_blocks_are_dense():
    c = compute("deepseek-v3")
    assert c.n_moe_layers == 58 and c.n_shared == 1
    assert c.by_part["dense_ffn"] == 3 * 3 * 7168 * 18432
    assert c.active_by_part["shared_experts"] == c.by_part["shared_experts"] == 58 * 3 * 7168 * 2048
    # MLA per block: q_a, q_b, kv_a (latent + shared rope key), kv_b, o
    mla = 7168 * 1536 + 1536 * 128 * 192 + 7168 * (512 + 64) + 512 * 128 * 256 + 128 * 128 * 7168
    assert c.by_part["attention"] == 61 * mla


# ----------------------------------------------------------------------------- invariants of every entry

@pytest.mark.parametrize("name", published_models())
def test_invariants(name):
    c = compute(name)
    assert c.total > c.active_per_token > 0
    assert set(c.by_part) == set(c.active_by_part) == set(PARTS)
    assert sum(c.by_part.values()) == c.total and sum(c.active_by_part.values()) == c.active_per_token
    # only the routed experts differ between total and active, by exactly top_k / n_experts
    assert c.active_by_part["routed_experts"] * c.n_experts == c.by_part["routed_experts"] * c.top_k
    for part in PARTS:
        if part != "routed_experts":
            assert c.active_by_part[part] == c.by_part[part]
    assert 0 < c.n_moe_layers <= c.n_layer and 0 < c.top_k <= c.n_experts
    assert c.source.startswith("https://") and c.notes and c.published_total > 0


@pytest.mark.parametrize("name", published_models())
def test_as_dict_is_json_ready(name):
    d = compute(name).as_dict()
    for key in ("model", "total", "active_per_token", "published_total", "published_active_per_token", "source"):
        assert key in d
    back = json.loads(json.dumps(d))
    assert back["model"] == name and back["hyper_parameters"]["d_model"] == spec(name).d_model


# ----------------------------------------------------------------------------- Mixtral by hand

def test_mixtral_parts_by_hand():
    c = compute("mixtral-8x7b")
    d, layers, vocab = 4096, 32, 32000
    one_expert = 3 * 4096 * 14336                    # SwiGLU: gate, up, down
    attention = d * 32 * 128 + 2 * d * 8 * 128 + 32 * 128 * d   # GQA: 32 query heads, 8 key/value heads of 128
    assert c.by_part["routed_experts"] == layers * 8 * one_expert
    assert c.active_by_part["routed_experts"] == layers * 2 * one_expert
    assert c.by_part["attention"] == layers * attention
    assert c.by_part["router"] == layers * d * 8
    assert c.by_part["embeddings"] == 2 * vocab * d  # untied input table and output head
    assert c.by_part["norms"] == (2 * layers + 1) * d
    assert c.by_part["shared_experts"] == c.by_part["dense_ffn"] == c.by_part["other"] == 0
    assert c.total == 46_702_792_704 and c.active_per_token == 12_879_925_248


# ----------------------------------------------------------------------------- memory and errors

def test_memory_bytes():
    n = 1_000_003
    assert memory_bytes(n, "fp32") == 4 * n
    assert memory_bytes(n, "bf16") == memory_bytes(n, "fp16") == 2 * n
    assert memory_bytes(n, "fp8") == n


def test_bad_dtype_is_a_value_error_that_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown dtype 'int3'; choose one of: fp32, bf16, fp16, fp8"):
        memory_bytes(10, "int3")


def test_unknown_model_is_a_value_error_that_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'gpt-17'; choose one of: .*mixtral-8x7b"):
        compute("gpt-17")


def test_module_does_not_need_torch():
    # pure Python: importable and usable without touching torch
    assert "torch" not in published.__dict__
