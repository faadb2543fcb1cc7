"""Total vs active parameters of published MoE models, computed from their hyper-parameters.

Every entry below is one `Arch`: the hyper-parameters copied from the model's
config.json (or, for the two Google models without one, from the paper and the
released checkpoint config), the totals the authors published, and where both
come from. `compute(name)` rebuilds the parameter count tensor by tensor from
those hyper-parameters; nothing here is a hard-coded total.

Counting convention
-------------------
total  = every weight stored in the checkpoint for the language model
         (tied input/output embeddings once; vision towers and speculative /
         multi-token-prediction heads are not part of the language model and
         are left out, see each entry's notes).
active = the parameters that touch one token in one forward pass = everything
         except the routed experts the router did not pick: the embeddings
         (input table; the output head too when it is untied), attention,
         routers, top_k routed experts in every MoE layer, all shared experts,
         dense FFNs, norms.

The input embedding is a row *lookup*, not a matmul: a token reads one row of
a vocab x d_model table. We still count the whole table as active because
that is how the publishers count: DeepSeek says so outright, and the Mistral,
AI2, Meta and Google (GLaM) figures are only reproduced with it (Qwen's rounded
22B fits either way); with tied weights the same matrix *is* the output
head's matmul anyway. OpenAI's gpt-oss card is the exception (it counts the
unembedding but not the embedding); `active_as_published()` applies each
publisher's own convention so the published figure can be checked exactly.

Encoder-decoder (Switch-C): both stacks are counted, and "active" is the
parameters touched per token position through encoder AND decoder with one
expert per MoE layer. See the Switch-C notes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

PARTS = ("embeddings", "attention", "router", "routed_experts", "shared_experts", "dense_ffn", "norms", "other")

BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}

GATED = {"swiglu": True, "geglu": True, "relu": False, "gelu": False}  # gated FFNs have 3 matrices, plain ones 2


@dataclass(frozen=True)
class Arch:
    """The hyper-parameters of one published model, plus what its authors published."""

    key: str
    label: str
    # --- trunk
    n_layer: int                  # transformer blocks (encoder + decoder for an encoder-decoder)
    d_model: int
    vocab: int
    tied_embeddings: bool          # input table reused as the output head
    n_encoder_layers: int = 0      # > 0: encoder-decoder; the other n_layer - n_encoder_layers blocks
                                   # are decoder blocks with an extra cross-attention
    # --- attention
    attention: str = "gqa"         # "gqa" (MHA when n_kv_heads == n_heads) or "mla" (DeepSeek latent attention)
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    attn_bias: bool = False        # biases on q, k, v and the output projection
    attn_sinks: bool = False       # one learned sink logit per head (gpt-oss)
    qk_norm: str = ""              # "" none / weightless; "head": RMSNorm(head_dim) on q and k;
                                   # "full": RMSNorm over all q heads and all k heads (OLMoE)
    q_lora_rank: int = 0           # MLA only (0: no query compression)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rel_pos_buckets: int = 0       # T5-style relative position bias: buckets x heads
    rel_pos_shared: bool = True    # True: one table per stack (T5); False: one per layer
    # --- feed-forward
    moe_layers: tuple[int, ...] = ()   # indices of blocks whose FFN is an MoE layer
    n_experts: int = 0             # routed experts per MoE layer
    top_k: int = 0
    d_expert: int = 0              # hidden width of one routed expert
    expert_act: str = "swiglu"
    n_shared: int = 0              # shared (always-on) experts per MoE layer
    d_shared: int = 0              # hidden width of ONE shared expert
    d_ff_dense: int = 0            # hidden width of the dense FFN in non-MoE blocks
    dense_act: str = "swiglu"
    ffn_bias: bool = False         # biases on expert / FFN projections (gpt-oss)
    router_bias: bool = False      # a per-expert bias next to the router matrix
    # --- what was published
    published_total: int = 0
    published_active_per_token: int | None = None  # None = the authors published no active-parameter count
    active_excludes_input_embedding: bool = False   # the publisher's "active" leaves the input table out
    source: str = ""
    notes: str = ""


# ----------------------------------------------------------------------------- the entries
# Order: by release date, so the dashboard tells the story from Switch to gpt-oss.

SWITCH_C_2048 = Arch(
    key="switch-c-2048", label="Switch-C 2048",
    # google/switch-c-2048 config.json and the T5X gin it was exported from
    # (flaxformer/t5x/configs/moe/models/switch_c.gin): d_model 2080, 30 heads x 64,
    # d_ff 6144 ReLU, 15 encoder + 15 decoder blocks, every FFN sparse, 2048 experts, top-1.
    n_layer=30, n_encoder_layers=15, d_model=2080, vocab=32128,
    tied_embeddings=False,          # gin: "Switch Transformer C uses a separate output logits layer"
    n_heads=30, n_kv_heads=30, head_dim=64,
    rel_pos_buckets=32, rel_pos_shared=True,   # T5: one bias table in the first block of each stack
    moe_layers=tuple(range(30)), n_experts=2048, top_k=1, d_expert=6144, expert_act="relu",
    router_bias=False,
    published_total=1_571_000_000_000,  # Switch paper, Table 9: "1571B"
    published_active_per_token=None,              # not published (Table 9 gives 890B FLOPs per sequence instead)
    source="https://arxiv.org/abs/2101.03961 (Table 9: 1571B) ; "
           "https://huggingface.co/google/switch-c-2048/blob/main/config.json ; "
           "https://github.com/google/flaxformer/blob/main/flaxformer/t5x/configs/moe/models/switch_c.gin",
    notes="Encoder-decoder (T5 layout): 15 encoder blocks (self-attention + MoE) and 15 decoder blocks "
          "(self-attention + cross-attention + MoE); both stacks are counted. The hyper-parameters of the "
          "released checkpoint (d_model 2080, 30 heads x 64) reproduce the paper's 1571B to 0.05%; the "
          "paper's Table 9 row (d_model 2048, 32 heads, d_kv 128) would give only 1548B, so we use the "
          "checkpoint. The HF model card's '1.6T parameters for 3.1 TB' is the same count in bf16. "
          "The paper publishes no active-parameter count (published_active_per_token is None); with top-1 routing our "
          "active is ~1.75B (0.11% of the model), of which an input token uses the encoder half and a "
          "target token the decoder half. HF config.json says num_decoder_layers 12, but "
          "num_sparse_decoder_layers 15, the T5X gin and the 3.1 TB checkpoint all mean 15.",
)

GLAM_1_2T = Arch(
    key="glam-1.2t", label="GLaM (64B/64E)",
    # GLaM paper, Table 4, row GLaM (64B/64E): L 64, M 8192, H 32768, 128 heads x 128, E 64, top-2,
    # every other FFN is MoE; 256K SentencePiece vocab; shared input/output embedding.
    n_layer=64, d_model=8192, vocab=256_000, tied_embeddings=True,
    n_heads=128, n_kv_heads=128, head_dim=128,
    rel_pos_buckets=32, rel_pos_shared=False,  # per-layer relative position bias (buckets as in praxis glam.py)
    moe_layers=tuple(range(0, 64, 2)), n_experts=64, top_k=2, d_expert=32768,
    expert_act="gelu",              # experts are plain 2-matrix FFNs ...
    d_ff_dense=32768, dense_act="geglu",  # ... only the non-MoE FFNs use the gated GLU (3 matrices)
    published_total=1_200_000_000_000,  # "1.2 trillion parameters"
    published_active_per_token=96_600_000_000,    # "activates ... 96.6B parameters per token"
    source="https://arxiv.org/abs/2112.06905 (Table 4) ; "
           "https://ai.googleblog.com/2021/12/more-efficient-in-context-learning-with.html",
    notes="Decoder-only; the FFN of every other block is a 64-expert top-2 MoE (32 MoE layers). The paper "
          "puts the gated GELU (GLU) only in the non-MoE feed-forward sub-layers, so a dense FFN has 3 "
          "matrices and an expert 2; with that reading the table's hyper-parameters give 96.6B active "
          "(embedding counted once, it is tied) to 0.1%, and 1.162T total, which the paper rounds to "
          "'1.2T' (3.2% below 1.2T exactly). The other readings do not fit the paper's own pair: gated "
          "experts would give 1.71T total and 113.8B active, plain dense FFNs 88.0B active. Vocab size: the paper says 256K; 256,000 vs 262,144 changes the total by 0.004%. "
          "No config.json was released, so these values come from the paper's table.",
)

MIXTRAL_8X7B = Arch(
    key="mixtral-8x7b", label="Mixtral 8x7B",
    # mistralai/Mixtral-8x7B-v0.1 config.json
    n_layer=32, d_model=4096, vocab=32000, tied_embeddings=False,
    n_heads=32, n_kv_heads=8, head_dim=128,
    moe_layers=tuple(range(32)), n_experts=8, top_k=2, d_expert=14336, expert_act="swiglu",
    published_total=46_700_000_000, published_active_per_token=12_900_000_000,
    source="https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json ; "
           "https://mistral.ai/news/mixtral-of-experts/ (46.7B total, 12.9B per token)",
    notes="Every block is MoE: 8 SwiGLU experts (3 x 4096 x 14336 each), top-2, no shared expert. "
          "GQA with 32 query and 8 key/value heads of 128. Untied input and output embeddings are both "
          "in Mistral's 12.9B. The name '8x7B' is not 56B: only the FFNs are replicated, attention and "
          "embeddings exist once.",
)

OLMOE_1B_7B = Arch(
    key="olmoe-1b-7b", label="OLMoE-1B-7B",
    # allenai/OLMoE-1B-7B-0924 config.json
    n_layer=16, d_model=2048, vocab=50304, tied_embeddings=False,
    n_heads=16, n_kv_heads=16, head_dim=128,
    qk_norm="full",                 # q_norm = RMSNorm(2048), k_norm = RMSNorm(16 x 128)
    moe_layers=tuple(range(16)), n_experts=64, top_k=8, d_expert=1024, expert_act="swiglu",
    published_total=6_900_000_000, published_active_per_token=1_300_000_000,
    source="https://huggingface.co/allenai/OLMoE-1B-7B-0924/blob/main/config.json ; "
           "https://arxiv.org/abs/2409.02060 (6.9B total, 1.3B active)",
    notes="Fine-grained experts: 64 small SwiGLU experts (width 1024) per layer, 8 active, in all 16 blocks; "
          "full multi-head attention with QK-norm. The name says 1B/7B; the paper's exact figures are "
          "6.9B total and 1.3B active, which include both untied embedding tables.",
)

DEEPSEEK_V3 = Arch(
    key="deepseek-v3", label="DeepSeek-V3",
    # deepseek-ai/DeepSeek-V3 config.json
    n_layer=61, d_model=7168, vocab=129280, tied_embeddings=False,
    attention="mla", n_heads=128, n_kv_heads=128,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    moe_layers=tuple(range(3, 61)),   # first_k_dense_replace = 3, moe_layer_freq = 1
    n_experts=256, top_k=8, d_expert=2048, expert_act="swiglu",
    n_shared=1, d_shared=2048,
    d_ff_dense=18432, dense_act="swiglu",
    router_bias=True,               # e_score_correction_bias: the aux-loss-free balancing bias, 256 per layer
    published_total=671_000_000_000, published_active_per_token=37_000_000_000,
    source="https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json ; "
           "https://arxiv.org/abs/2412.19437 (671B total, 37B activated) ; "
           "https://github.com/deepseek-ai/DeepSeek-V3/blob/main/README_WEIGHTS.md",
    notes="Multi-head Latent Attention: queries through a 1536-rank bottleneck, keys/values through a "
          "512-rank latent plus a 64-dim shared RoPE key. Blocks 0-2 have a dense SwiGLU FFN (18432); "
          "blocks 3-60 are MoE with 256 routed experts (top-8) and 1 shared expert, all of width 2048. "
          "The published 671B is the main model only: the HF checkpoint (685B) also holds one "
          "multi-token-prediction module (num_nextn_predict_layers = 1), one more MLA + MoE block plus a "
          "2d x d projection, ~11.6B unique parameters by these hyper-parameters (DeepSeek: 11.5B, 14B "
          "with the embedding and head it shares). README_WEIGHTS gives 36.7B activated including 0.9B "
          "embedding and 0.9B output head, i.e. the same convention as ours; we get 37.6B.",
)

LLAMA_4_MAVERICK = Arch(
    key="llama-4-maverick", label="Llama 4 Maverick",
    # meta-llama/Llama-4-Maverick-17B-128E-Instruct config.json, text_config
    n_layer=48, d_model=5120, vocab=202048, tied_embeddings=False,
    n_heads=40, n_kv_heads=8, head_dim=128,
    qk_norm="",                     # use_qk_norm: an L2 norm without weights, so no parameters
    moe_layers=tuple(range(1, 48, 2)),  # interleave_moe_layer_step = 2: blocks 1, 3, ..., 47
    n_experts=128, top_k=1, d_expert=8192, expert_act="swiglu",
    n_shared=1, d_shared=8192,
    d_ff_dense=16384, dense_act="swiglu",   # intermediate_size_mlp
    published_total=400_000_000_000, published_active_per_token=17_000_000_000,
    source="https://huggingface.co/meta-llama/Llama-4-Maverick-17B-128E-Instruct/blob/main/config.json ; "
           "https://ai.meta.com/blog/llama-4-multimodal-intelligence/ (17B active, 128 experts, 400B total)",
    notes="Dense and MoE blocks alternate: 24 dense SwiGLU FFNs of width 16384 and 24 MoE layers with 128 "
          "routed experts (top-1) plus 1 shared expert, all of width 8192. GQA 40/8 heads of 128. The text "
          "model alone reproduces Meta's 400B/17B (embeddings included); the vision encoder and projector "
          "of the multimodal checkpoint are not counted here.",
)

QWEN3_235B_A22B = Arch(
    key="qwen3-235b-a22b", label="Qwen3-235B-A22B",
    # Qwen/Qwen3-235B-A22B config.json
    n_layer=94, d_model=4096, vocab=151936, tied_embeddings=False,
    n_heads=64, n_kv_heads=4, head_dim=128,
    qk_norm="head",                 # q_norm / k_norm = RMSNorm(head_dim)
    moe_layers=tuple(range(94)),    # decoder_sparse_step 1, mlp_only_layers []
    n_experts=128, top_k=8, d_expert=1536, expert_act="swiglu",
    published_total=235_000_000_000, published_active_per_token=22_000_000_000,
    source="https://huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json ; "
           "https://huggingface.co/Qwen/Qwen3-235B-A22B (235B total, 22B activated)",
    notes="All 94 blocks are MoE: 128 SwiGLU experts of width 1536, top-8, no shared expert (unlike "
          "Qwen2-MoE). GQA with 64 query heads and only 4 key/value heads of 128, plus per-head QK RMSNorm. "
          "The config's intermediate_size 12288 is unused because no block is dense.",
)

GPT_OSS_120B = Arch(
    key="gpt-oss-120b", label="gpt-oss-120b",
    # openai/gpt-oss-120b config.json; shapes as in github.com/openai/gpt-oss gpt_oss/torch/model.py
    n_layer=36, d_model=2880, vocab=201088, tied_embeddings=False,
    n_heads=64, n_kv_heads=8, head_dim=64,
    attn_bias=True, attn_sinks=True,
    moe_layers=tuple(range(36)), n_experts=128, top_k=4, d_expert=2880, expert_act="swiglu",
    ffn_bias=True, router_bias=True,
    published_total=116_830_000_000, published_active_per_token=5_130_000_000,
    active_excludes_input_embedding=True,
    source="https://huggingface.co/openai/gpt-oss-120b/blob/main/config.json ; "
           "https://arxiv.org/abs/2508.10925 (model card: 116.83B total, 5.13B active)",
    notes="Every block is MoE: 128 SwiGLU experts of width 2880 with biases (mlp1: 2 x 2880 fused gate/up, "
          "mlp2: 2880), top-4; the router is a Linear with bias. Attention has q/k/v/o biases and one "
          "learned sink per head; GQA 64/8 heads of 64, alternating banded-window and dense layers (no "
          "parameter difference). OpenAI counts the unembedding as active but not the embedding lookup, "
          "so their 5.13B equals our active minus the 0.58B input table (5.71B by our convention).",
)

REGISTRY: dict[str, Arch] = {a.key: a for a in (
    SWITCH_C_2048, GLAM_1_2T, MIXTRAL_8X7B, OLMOE_1B_7B, DEEPSEEK_V3,
    LLAMA_4_MAVERICK, QWEN3_235B_A22B, GPT_OSS_120B,
)}


# ----------------------------------------------------------------------------- counting


def _ffn_params(d: int, width: int, act: str, bias: bool) -> int:
    """One feed-forward network: gated (SwiGLU/GEGLU) has gate, up and down; plain (ReLU/GELU) up and down."""
    n = (3 if GATED[act] else 2) * d * width
    if bias:
        n += (2 if GATED[act] else 1) * width + d   # bias on the (fused) input projection, then on the output
    return n


def _attention_params(a: Arch) -> int:
    """One attention module (self- or cross-): projections, biases, sinks. Norms are counted separately."""
    d, h = a.d_model, a.n_heads
    if a.attention == "mla":
        qk_dim = a.qk_nope_head_dim + a.qk_rope_head_dim
        # queries: d -> q_lora -> heads, or straight d -> heads when there is no query bottleneck
        q = (d * a.q_lora_rank + a.q_lora_rank * h * qk_dim) if a.q_lora_rank else d * h * qk_dim
        # keys/values: d -> (kv latent + one shared RoPE key), then latent -> per-head k_nope and v
        kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)
        o = h * a.v_head_dim * d
        n = q + kv + o
    else:
        q_dim, kv_dim = h * a.head_dim, a.n_kv_heads * a.head_dim
        n = d * q_dim + 2 * d * kv_dim + q_dim * d
        if a.attn_bias:
            n += q_dim + 2 * kv_dim + d
    if a.attn_sinks:
        n += h
    return n


def _attention_norm_params(a: Arch) -> int:
    """Norms that live inside one attention module: MLA's latent norms, QK-norm."""
    if a.attention == "mla":
        return a.q_lora_rank + a.kv_lora_rank        # q_a_layernorm, kv_a_layernorm
    if a.qk_norm == "head":
        return 2 * a.head_dim
    if a.qk_norm == "full":
        return (a.n_heads + a.n_kv_heads) * a.head_dim
    return 0


def _count(a: Arch) -> tuple[dict[str, int], dict[str, int]]:
    """(total, active) split by PARTS, summed block by block."""
    total = dict.fromkeys(PARTS, 0)
    active = dict.fromkeys(PARTS, 0)

    def add(part: str, n: int, n_active: int | None = None) -> None:
        total[part] += n
        active[part] += n if n_active is None else n_active

    d = a.d_model
    add("embeddings", a.vocab * d * (1 if a.tied_embeddings else 2))

    n_stacks = 2 if a.n_encoder_layers else 1
    moe = set(a.moe_layers)
    expert = _ffn_params(d, a.d_expert, a.expert_act, a.ffn_bias) if moe else 0
    for i in range(a.n_layer):
        cross = a.n_encoder_layers > 0 and i >= a.n_encoder_layers   # decoder block of an encoder-decoder
        n_attn = 2 if cross else 1
        add("attention", n_attn * _attention_params(a))
        # pre-norms: one before each attention and one before the FFN; plus norms inside attention
        add("norms", (n_attn + 1) * d + n_attn * _attention_norm_params(a))
        if i in moe:
            add("router", d * a.n_experts + (a.n_experts if a.router_bias else 0))
            add("routed_experts", a.n_experts * expert, a.top_k * expert)
            add("shared_experts", a.n_shared * _ffn_params(d, a.d_shared, a.expert_act, a.ffn_bias))
        else:
            add("dense_ffn", _ffn_params(d, a.d_ff_dense, a.dense_act, a.ffn_bias))
    add("norms", n_stacks * d)    # final norm of each stack

    if a.rel_pos_buckets:         # relative position bias table(s): buckets x heads
        tables = n_stacks if a.rel_pos_shared else a.n_layer
        add("other", tables * a.rel_pos_buckets * a.n_heads)
    return total, active


# ----------------------------------------------------------------------------- API


@dataclass(frozen=True)
class ParamCount:
    model: str
    label: str
    total: int
    active_per_token: int            # parameters used per token
    by_part: dict[str, int]          # total split by PARTS
    active_by_part: dict[str, int]   # active split by PARTS
    n_experts: int                   # routed experts per MoE layer
    n_shared: int
    top_k: int
    n_layer: int
    n_moe_layers: int
    published_total: int
    published_active_per_token: int | None     # None when the authors published none
    source: str
    notes: str

    def as_dict(self) -> dict:
        """JSON-ready: every field, plus the hyper-parameters it was computed from."""
        d = asdict(self)
        arch = asdict(REGISTRY[self.model])
        arch["moe_layers"] = list(arch["moe_layers"])
        for k in ("key", "label", "published_total", "published_active_per_token", "source", "notes"):
            arch.pop(k)
        d["hyper_parameters"] = arch
        d["active_as_published"] = active_as_published(self.model)
        return d


def published_models() -> list[str]:
    """Every model this module knows, oldest release first."""
    return list(REGISTRY)


def spec(name: str) -> Arch:
    """The hyper-parameters of one published model."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def compute(name: str) -> ParamCount:
    """Total and active-per-token parameters of a published model, from its hyper-parameters."""
    a = spec(name)
    by_part, active_by_part = _count(a)
    return ParamCount(
        model=a.key, label=a.label,
        total=sum(by_part.values()), active_per_token=sum(active_by_part.values()),
        by_part=by_part, active_by_part=active_by_part,
        n_experts=a.n_experts, n_shared=a.n_shared, top_k=a.top_k,
        n_layer=a.n_layer, n_moe_layers=len(a.moe_layers),
        published_total=a.published_total, published_active_per_token=a.published_active_per_token,
        source=a.source, notes=a.notes,
    )


def active_as_published(name: str) -> int:
    """Our active count, restated in the publisher's own convention (gpt-oss leaves out the input table)."""
    a = spec(name)
    n = compute(name).active_per_token
    if a.active_excludes_input_embedding and not a.tied_embeddings:
        n -= a.vocab * a.d_model
    return n


def memory_bytes(n_params: int, dtype: str) -> int:
    """Bytes to hold n_params weights in `dtype` (weights only: no KV cache, activations or optimiser)."""
    if dtype not in BYTES_PER_PARAM:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(BYTES_PER_PARAM)}")
    return int(n_params) * BYTES_PER_PARAM[dtype]

