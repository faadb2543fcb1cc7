"""Our routing schemes against the routers in Hugging Face transformers' own modelling code (the
implementations `../shared/docs/routing-reference.md` reads): the same logits must pick the same
experts with the same weights, and the losses must agree up to the scale conventions the reference
lists. transformers is the `bench` extra, which `make test` installs.

Random router weights: no two scores of a token tie, so torch.topk's unspecified tie order (which
HF inherits, and our lowest-index rule replaces) does not enter."""
import pytest
import torch

from moe_core.model import routing as R

T = pytest.importorskip("transformers")
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as mixtral_lb  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter  # noqa: E402
from transformers.models.switch_transformers import modeling_switch_transformers as SW  # noqa: E402

D, TOKENS = 32, 96


def _by_expert(indices, weights):
    """(indices, weights) [T, k] sorted by expert number in each row, so unsorted top-k compare."""
    order = indices.argsort(dim=-1)
    return indices.gather(-1, order), weights.gather(-1, order)


def _router(cls, cfg, bias=None):
    torch.manual_seed(0)
    r = cls(cfg)
    with torch.no_grad():
        r.weight.normal_(0, 0.5)
        if bias is not None:
            r.bias.copy_(bias)
    return r


def _same_choice(hf_indices, hf_weights, ours: R.Routing):
    hi, hw = _by_expert(hf_indices, hf_weights.float())
    oi, ow = _by_expert(ours.indices, ours.weights)
    assert torch.equal(hi, oi)
    torch.testing.assert_close(hw, ow, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_experts,k", [(8, 2), (16, 4)])
def test_softmax_topk_is_mixtrals_router(n_experts, k):
    cfg = T.MixtralConfig(hidden_size=D, num_local_experts=n_experts, num_experts_per_tok=k)
    router, x = _router(MixtralTopKRouter, cfg), torch.randn(TOKENS, D)
    with torch.no_grad():
        logits, weights, indices = router(x)
        _same_choice(indices, weights, R.softmax_topk(logits, k, normalize=True))


@pytest.mark.parametrize("norm", [False, True])
def test_softmax_topk_normalize_is_qwen3_moes_norm_topk_prob(norm):
    cfg = T.Qwen3MoeConfig(hidden_size=D, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm)
    router, x = _router(Qwen3MoeTopKRouter, cfg), torch.randn(TOKENS, D)
    with torch.no_grad():
        logits, weights, indices = router(x)
        _same_choice(indices, weights, R.softmax_topk(logits, 4, normalize=norm))


def test_gpt_oss_router_is_softmax_topk_over_biased_logits():
    # gpt-oss takes the top-k logits (router bias included) and softmaxes over those k: the same as
    # renormalised softmax top-k on the biased logits
    cfg = T.GptOssConfig(hidden_size=D, num_local_experts=16, num_experts_per_tok=4)
    router = _router(GptOssTopKRouter, cfg, bias=torch.linspace(-1, 1, 16))
    x = torch.randn(TOKENS, D)
    with torch.no_grad():
        logits, weights, indices = router(x)
        _same_choice(indices, weights, R.softmax_topk(logits, 4, normalize=True))


@pytest.mark.parametrize("norm,scaling", [(True, 2.5), (False, 1.0)])
def test_deepseek_is_deepseek_v3s_router(norm, scaling):
    # DeepSeek-V3: sigmoid scores, a selection-only bias, group-limited top-k (8 groups, best 4, each
    # group scored by its top-2), weights from the unbiased scores, renormalised and scaled
    cfg = T.DeepseekV3Config(hidden_size=D, n_routed_experts=64, num_experts_per_tok=8, n_group=8, topk_group=4,
                             norm_topk_prob=norm, routed_scaling_factor=scaling)
    router, x = _router(DeepseekV3TopkRouter, cfg), torch.randn(TOKENS, D)
    bias = torch.randn(64) * 0.3
    router.e_score_correction_bias.copy_(bias)
    with torch.no_grad():
        logits, weights, indices = router(x)
        ours = R.deepseek(logits, 8, bias=bias, n_groups=8, topk_groups=4, normalize=norm, scaling=scaling)
        _same_choice(indices, weights, ours)
        # the bias changed which experts were picked, not only their order (or this test would not see it)
        unbiased = R.deepseek(logits, 8, n_groups=8, topk_groups=4)
        assert not torch.equal(ours.indices.sort(-1).values, unbiased.indices.sort(-1).values)


@pytest.mark.parametrize("capacity", [3, 8, 1000])
def test_switch_is_switch_transformers_top1_router(capacity):
    # top-1 by probability, weight = the raw top-1 probability, tokens over capacity dropped in order
    cfg = T.SwitchTransformersConfig(d_model=D, num_experts=8, expert_capacity=capacity, router_jitter_noise=0.0)
    torch.manual_seed(0)
    router = SW.SwitchTransformersTop1Router(cfg).eval()
    with torch.no_grad():
        router.classifier.weight.normal_(0, 0.5)
        x = torch.randn(1, TOKENS, D)
        expert_index, top_prob, logits = router(x)
        ours = R.switch(logits[0], capacity=capacity)
        assert torch.equal(expert_index[0].bool(), ours.dispatch)
        kept = ours.dispatch.any(-1)
        assert 0 < int(kept.sum()) and (capacity >= TOKENS or not bool(kept.all()))
        torch.testing.assert_close(ours.combine.sum(-1)[kept], top_prob[0, kept, 0])
        # the losses: HF's load-balancing loss over the pre-capacity choice, and its z-loss
        probs = logits.softmax(-1)
        torch.testing.assert_close(ours.aux["load_balance"], SW.load_balancing_loss_func(probs, probs.argmax(-1)))
        torch.testing.assert_close(ours.aux["z_loss"], SW.router_z_loss_func(logits))
        torch.testing.assert_close(R.z_loss(logits[0]), SW.router_z_loss_func(logits))


def test_softmax_topk_load_balance_is_mixtrals_divided_by_k():
    # routing-reference "aux loss scale": the Mixtral family counts all k picks without dividing by k
    # (uniform routing gives k); we divide, so uniform routing gives 1 at every k
    torch.manual_seed(1)
    logits = torch.randn(TOKENS, 8)
    for k in (1, 2, 4):
        ours = R.softmax_topk(logits, k).aux["load_balance"]
        torch.testing.assert_close(ours * k, mixtral_lb((logits,), num_experts=8, top_k=k))
    uniform = torch.zeros(TOKENS, 8)                            # every probability 1/8
    for k in (1, 2, 4):
        assert float(R.softmax_topk(uniform, k).aux["load_balance"]) == pytest.approx(1.0)
        assert float(mixtral_lb((uniform,), num_experts=8, top_k=k)) == pytest.approx(k)


@pytest.mark.parametrize("batch_prioritized", [False, True])
@pytest.mark.parametrize("capacity", [3, 10, 1000])
def test_gshard_is_nllb_moes_top2_router(capacity, batch_prioritized):
    # GShard top-2 as NLLB-MoE (fairseq) runs it, second expert always taken ("all"): every first choice
    # takes its slot before any second choice, in token order or by top-1 probability
    # (batch-prioritised), and the two weights are renormalised after dropping
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeTop2Router

    cfg = T.NllbMoeConfig(d_model=D, num_experts=8, expert_capacity=capacity, second_expert_policy="all",
                          normalize_router_prob_before_dropping=False, batch_prioritized_routing=batch_prioritized,
                          moe_eval_capacity_token_fraction=0.0, router_dtype="float32")
    torch.manual_seed(0)
    logits = torch.randn(TOKENS, 8) * 2
    _, hf_combine = NllbMoeTop2Router(cfg).eval().route_tokens(logits.clone())
    ours = R.gshard(logits, capacity=capacity, second_policy="all", batch_prioritized=batch_prioritized)
    torch.testing.assert_close(ours.combine, hf_combine, rtol=1e-5, atol=1e-6)
    # and the capacity did bite where it is small (else these cases would test no dropping)
    assert bool(ours.dropped.any()) == (8 * capacity < 2 * TOKENS)
