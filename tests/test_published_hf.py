"""The published-model calculator (`moe_core.model.published`) against Hugging Face transformers' own
modelling code: each architecture is built from OUR hyper-parameters with transformers' model class on
the meta device (no weights, no download, no memory), its parameters are counted and sorted into the
same parts, and both must agree exactly. transformers is the `bench` extra, which `make test` installs.

GLaM has no implementation in transformers, so it is not checked here."""
import collections

import pytest
import torch

from moe_core.model import published as P

T = pytest.importorskip("transformers")


def _config(name: str):
    a = P.spec(name)
    common = dict(vocab_size=a.vocab, hidden_size=a.d_model, num_hidden_layers=a.n_layer,
                  num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                  tie_word_embeddings=a.tied_embeddings)
    if name == "mixtral-8x7b":
        return T.MixtralConfig(**common, head_dim=a.head_dim, intermediate_size=a.d_expert,
                               num_local_experts=a.n_experts, num_experts_per_tok=a.top_k)
    if name == "qwen3-235b-a22b":
        return T.Qwen3MoeConfig(**common, head_dim=a.head_dim, moe_intermediate_size=a.d_expert,
                                num_experts=a.n_experts, num_experts_per_tok=a.top_k, decoder_sparse_step=1,
                                mlp_only_layers=[])
    if name == "olmoe-1b-7b":
        return T.OlmoeConfig(**common, intermediate_size=a.d_expert, num_experts=a.n_experts,
                             num_experts_per_tok=a.top_k)
    if name == "deepseek-v3":
        return T.DeepseekV3Config(**common, intermediate_size=a.d_ff_dense, moe_intermediate_size=a.d_expert,
                                  n_shared_experts=a.n_shared, n_routed_experts=a.n_experts,
                                  num_experts_per_tok=a.top_k, first_k_dense_replace=min(a.moe_layers),
                                  q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank,
                                  qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
                                  v_head_dim=a.v_head_dim, n_group=8, topk_group=4)
    if name == "gpt-oss-120b":
        return T.GptOssConfig(**common, head_dim=a.head_dim, intermediate_size=a.d_expert,
                              num_local_experts=a.n_experts, num_experts_per_tok=a.top_k)
    if name == "llama-4-maverick":
        moe = tuple(range(1, a.n_layer, 2))
        assert a.moe_layers == moe            # every second block, as interleave_moe_layer_step=2 builds
        return T.Llama4TextConfig(**common, head_dim=a.head_dim, intermediate_size=a.d_expert,
                                  intermediate_size_mlp=a.d_ff_dense, num_local_experts=a.n_experts,
                                  num_experts_per_tok=a.top_k, interleave_moe_layer_step=2)
    raise KeyError(name)


def _part(name: str) -> str:
    """transformers' parameter (or buffer) name -> our part."""
    if "embed_tokens" in name or name.startswith("lm_head") or name == "shared.weight":
        return "embeddings"
    if "norm" in name:                                  # block norms, QK-norm, MLA's latent norms
        return "norms"
    if ".experts." in name:
        return "routed_experts"
    if "shared_expert" in name:
        return "shared_experts"
    if ".gate.weight" in name or ".router." in name or "e_score_correction_bias" in name:
        return "router"
    if "self_attn" in name:                             # projections, biases, gpt-oss's sinks
        return "attention"
    if ".mlp." in name or ".feed_forward." in name:
        return "dense_ffn"
    return "other"


def _hf_parts(model) -> dict[str, int]:
    parts = collections.Counter()
    for name, p in model.named_parameters():
        parts[_part(name)] += p.numel()
    # DeepSeek-V3's selection bias is in the checkpoint but transformers keeps it as a buffer (it is
    # updated by the balancing rule, not by gradients); we count it with the router
    for name, b in model.named_buffers():
        if "e_score_correction_bias" in name:
            parts["router"] += b.numel()
    return {k: v for k, v in parts.items() if v}


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-235b-a22b", "olmoe-1b-7b", "deepseek-v3",
                                  "gpt-oss-120b", "llama-4-maverick"])
def test_calculator_matches_transformers_model_classes_part_by_part(name):
    cfg = _config(name)
    with torch.device("meta"):
        model = (T.Llama4ForCausalLM(cfg) if name == "llama-4-maverick"
                 else T.AutoModelForCausalLM.from_config(cfg))
    ours = P.compute(name)
    assert _hf_parts(model) == {k: v for k, v in ours.by_part.items() if v}
    assert sum(_hf_parts(model).values()) == ours.total


def test_switch_c_2048_matches_transformers_switch_transformers():
    """Switch-C: the full 2048 experts would mean 123k expert modules (25 s to build even on the meta
    device), so both sides use 16 experts per layer; everything else is the published model's."""
    import dataclasses

    a = dataclasses.replace(P.spec("switch-c-2048"), n_experts=16)
    half = a.n_layer // 2
    cfg = T.SwitchTransformersConfig(vocab_size=a.vocab, d_model=a.d_model, d_kv=a.head_dim, d_ff=a.d_expert,
                                     num_layers=half, num_decoder_layers=half, num_sparse_encoder_layers=half,
                                     num_sparse_decoder_layers=half, num_heads=a.n_heads, num_experts=a.n_experts,
                                     relative_attention_num_buckets=a.rel_pos_buckets,
                                     tie_word_embeddings=a.tied_embeddings)
    with torch.device("meta"):
        model = T.SwitchTransformersForConditionalGeneration(cfg)
    # T5's layout, as in the checkpoint: the encoder and the decoder read the one `shared` input table
    # (transformers 5 ties them to it only together with the output head, which Switch-C keeps apart)
    model.encoder.embed_tokens = model.decoder.embed_tokens = model.shared
    hf_total = sum(p.numel() for p in model.parameters())      # parameters() counts a shared tensor once
    total, _ = P._count(a)
    assert hf_total == sum(total.values())
