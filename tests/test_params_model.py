"""Parameter accounting by hand, and the model's forward/loss contract."""
import pytest
import torch
import torch.nn.functional as F

from moe_core.model.layer import MoELayer
from moe_core.model.gpt import LMHeadCrossEntropy, MoEConfig, MoEGPT
from moe_core.model.params import count_params, memory_bytes, params_by_part


def test_moe_layer_parameters_by_hand():
    layer = MoELayer(4, 3, 5, 2, n_shared=1)
    # router 5x4; each SwiGLU expert 4x(2*3) + 3x4 = 36; shared expert (width 1*3) also 36
    parts = params_by_part(layer)
    assert parts["router"] == 20 and parts["routed_experts"] == 5 * 36 and parts["shared_experts"] == 36
    r = count_params(layer)
    assert r.total == 20 + 180 + 36
    assert r.active_per_token == 20 + 2 * 36 + 36
    assert count_params(layer, top_k=4).active_per_token == 20 + 4 * 36 + 36
    assert count_params(layer, scheme="switch").active_per_token == 20 + 36 + 36


def test_tiny_model_parameters_by_hand():
    cfg = MoEConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, d_model=8, d_ff=4, n_experts=3, top_k=1)
    m = MoEGPT(cfg)
    parts = params_by_part(m)
    assert parts["embeddings"] == 50 * 8 + 8 * 8          # tied head counted once
    assert parts["attention"] == 2 * (8 * 24 + 8 * 8)
    assert parts["router"] == 2 * 3 * 8
    assert parts["routed_experts"] == 2 * 3 * (8 * 8 + 4 * 8)
    assert parts["norms"] == (2 * 2 + 1) * 8
    assert sum(parts.values()) == sum(p.numel() for p in m.parameters())
    r = count_params(m)
    assert r.total - r.active_per_token == 2 * 2 * (8 * 8 + 4 * 8)  # two unused experts per layer
    assert r.ratio == pytest.approx(r.total / r.active_per_token)


def test_active_stays_equal_while_total_grows_with_n():
    reports = [count_params(MoEGPT(MoEConfig(n_experts=n))) for n in (4, 8, 16)]
    # only the router grows in the active count (d_model numbers per expert per layer)
    assert reports[1].active_per_token - reports[0].active_per_token == 4 * 128 * 4
    assert reports[0].total < reports[1].total < reports[2].total


def test_memory_bytes():
    assert memory_bytes(10, "bf16") == 20 and memory_bytes(10, "fp8") == 10 and memory_bytes(10, "fp32") == 40
    with pytest.raises(ValueError, match="unknown dtype"):
        memory_bytes(10, "int3")


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=8, n_experts=4)
    return MoEGPT(MoEConfig(**{**cfg, **kw}))


def test_forward_returns_logits_loss_and_routing_per_layer():
    m = tiny_model(aux_loss_coef=0.01, z_loss_coef=0.001)
    idx = torch.randint(0, 64, (2, 16))
    logits, loss, routings = m(idx, idx)
    assert logits.shape == (2, 16, 64) and len(routings) == 2
    assert routings[0].n_tokens == 32
    out = m(idx, idx)
    expected = out.ce_loss + 0.01 * out.aux["load_balance"] + 0.001 * out.aux["z_loss"]
    assert out.loss.item() == pytest.approx(expected.item())
    assert m(idx).loss is None


def test_fused_chunked_loss_matches_cross_entropy_and_its_gradients():
    x = torch.randn(700, 16, requires_grad=True)
    w = torch.randn(64, 16, requires_grad=True)
    t = torch.randint(0, 64, (700,))
    t[::7] = -1
    ref = F.cross_entropy(x @ w.T, t, ignore_index=-1)
    gx, gw = torch.autograd.grad(ref, (x, w))
    fused = LMHeadCrossEntropy.apply(x, w, t, 256)
    fx, fw = torch.autograd.grad(fused, (x, w))
    assert fused.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(gx, fx, atol=1e-6) and torch.allclose(gw, fw, atol=1e-6)


def test_masked_tokens_are_not_routed():
    m = tiny_model(scheme="switch", top_k=1, capacity_factor=1.0).eval()
    idx = torch.randint(0, 64, (1, 16))
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, :10] = True
    out_masked = m(idx, mask=mask)
    out_short = m(idx[:, :10])
    assert out_masked.routings[0].n_tokens == 10
    assert torch.equal(out_masked.routings[1].indices, out_short.routings[1].indices)
    assert torch.allclose(out_masked.logits[:, :10], out_short.logits, atol=1e-5)


def test_bias_balancing_updates_only_the_buffer():
    m = tiny_model(scheme="deepseek", bias_update_rate=0.1)
    out = m(torch.randint(0, 64, (2, 16)))
    m.update_expert_bias(out.routings)
    bias = m.moe_layers[0].expert_bias
    assert bias.abs().sum() > 0 and not bias.requires_grad
    assert set(torch.round(bias * 10).tolist()) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("kw, message", [
    (dict(top_k=9), "top_k"),
    (dict(d_model=15), "divisible"),
    (dict(bias_update_rate=0.1), "deepseek"),
    (dict(aux_loss_coef=-1.0), "non-negative"),
    (dict(scheme="softmax_topk", capacity_factor=1.0), "no capacity"),
])
def test_bad_model_config(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**kw)
