"""The trivial routers: hash routing (Roller et al. 2021) and random routing, the baselines of the zoo.

Hash routing must depend on the token id alone (not the router, not the context), spread the vocabulary
evenly, reach the router through the model's own token ids, and generate token by token; random routing
must draw again each call, be repeatable with a seed, and balance on average. The shipped moe-n8-hash
checkpoint must be trained like moe-n8.
"""
from __future__ import annotations

import json

import pytest
import torch

from moe_core.cli import main
from moe_core.data.tokenizer import get_tokenizer
from moe_core.generate import PER_TOKEN_SCHEMES, generate
from moe_core.model.checkpoint import load
from moe_core.model.gpt import MoEConfig, MoEGPT
from moe_core.model.layer import MoELayer
from moe_core.model.request import RoutingRequest
from moe_core.model.routing import hash_routing, hash_scores, random_routing, route



def test_hash_routing_depends_on_the_token_id_alone():
    ids = torch.tensor([5, 9, 5, 700, 5])
    a = hash_routing(torch.randn(5, 8), 2, token_ids=ids)
    b = hash_routing(torch.randn(5, 8) * 50, 2, token_ids=ids)         # other router logits: the same experts
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.indices[0], a.indices[2]) and torch.equal(a.indices[0], a.indices[4])
    assert (a.weights == 0.5).all() and (a.indices[:, 0] != a.indices[:, 1]).all()
    assert torch.allclose(a.combine, a.probs)                           # no scores: the bars show the weights


def test_hash_spreads_the_vocabulary_evenly_and_its_k_experts_are_unrelated():
    s = hash_scores(torch.arange(4096), 8)
    first = torch.bincount(s.argmax(1), minlength=8)
    assert first.min() >= 0.85 * 512 and first.max() <= 1.15 * 512, first
    corr = torch.corrcoef(s.T) - torch.eye(8)
    assert corr.abs().max() < 0.08, corr


def test_hash_routing_needs_token_ids_and_says_so():
    with pytest.raises(ValueError, match="token ids"):
        route(torch.randn(3, 8), "hash", k=2)
    with pytest.raises(ValueError, match="3 non-negative token ids"):
        hash_routing(torch.randn(3, 8), 2, token_ids=torch.tensor([1, 2]))
    layer = MoELayer(16, 8, 4, 2, scheme="hash")
    for bad, got in [([1, 2, 3], "got list"), (torch.ones(3), "torch.float32 tensor of shape"),
                     (torch.tensor([1, -2, 3]), "int64 tensor"), (None, "call the model with token ids")]:
        with pytest.raises(ValueError, match=got):
            layer(torch.randn(3, 16), bad)


def test_random_routing_draws_again_each_call_and_balances_on_average():
    g = torch.Generator().manual_seed(0)
    a, b = random_routing(torch.zeros(4000, 8), 2, generator=g), random_routing(torch.zeros(4000, 8), 2, generator=g)
    assert not torch.equal(a.indices, b.indices)
    load = a.load.float() / a.load.sum()
    assert (load - 1 / 8).abs().max() < 0.02
    again = random_routing(torch.zeros(4000, 8), 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.indices, a.indices)                        # seeded: repeatable


def test_no_gradient_reaches_the_router_of_a_hash_model():
    torch.manual_seed(0)
    net = MoEGPT(MoEConfig(n_layer=1, n_head=2, d_model=32, d_ff=32, block_size=16, vocab_size=64, scheme="hash"))
    ids = torch.randint(0, 64, (2, 16))
    net(ids, ids).loss.backward()
    assert net.blocks[0].moe.router.weight.grad is None
    assert net.blocks[0].moe.experts.w_in.grad.abs().sum() > 0


def test_the_model_passes_its_token_ids_to_the_router():
    m = load("moe-n8-hash")
    ids = torch.tensor([[17, 400, 17, 3000]])
    out = m.model(ids)
    expect = hash_scores(ids[0], 8).topk(2).indices
    for r in out.routings:
        assert [sorted(x) for x in r.indices.tolist()] == [sorted(x) for x in expect.tolist()]


@pytest.mark.parametrize("scheme", ["hash", "random"])
def test_generation_routes_the_trivial_routers_token_by_token(scheme):
    assert scheme in PER_TOKEN_SCHEMES
    m = load("moe-n8-hash" if scheme == "hash" else "moe-n8")
    request = RoutingRequest.make(m.config, scheme)
    toks = list(generate(m, "def add(a, b):", max_new_tokens=6, request=request))
    assert len([t for t in toks if t.phase == "decode"]) == 6
    if scheme == "hash":       # the experts of every token are its id's, in every layer, prompt or not
        for t in toks:
            want = sorted(hash_scores(torch.tensor([t.id]), 8).topk(2).indices[0].tolist())
            assert all(sorted(e) == want for e in t.experts)


def test_the_hash_checkpoint_is_trained_like_moe_n8():
    h, n8 = load("moe-n8-hash"), load("moe-n8")
    assert h.config.scheme == "hash" and h.config.n_experts == 8 and h.config.top_k == 2
    assert {k: v for k, v in h.config.to_dict().items() if k not in ("scheme", "aux_loss_coef", "z_loss_coef")} == \
        {k: v for k, v in n8.config.to_dict().items() if k not in ("scheme", "aux_loss_coef", "z_loss_coef")}
    same = lambda t: {k: v for k, v in t.items() if k != "threads"}    # noqa: E731 (CPU threads: speed only)
    assert same(h.recipe["train"]) == same(n8.recipe["train"])
    assert h.card["weights_sha256"]


def test_cli_route_takes_the_new_schemes(capsys):
    assert main(["route", "the cat", "--scheme", "hash", "--json"]) == 0
    hashed = json.loads(capsys.readouterr().out)
    assert hashed["scheme"] == "hash" and hashed["top_k"] == 2
    assert main(["route", "the cat", "--scheme", "random", "--seed", "3", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert main(["route", "the cat", "--scheme", "random", "--seed", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == a["layers"]          # seeded: the same draw


@pytest.mark.ui
def test_the_router_picture_says_a_hash_has_no_scores_and_lights_the_ids_experts(page, app_url):
    from tests.test_ui import IGNORED, SCREEN, open_app

    errors = open_app(page, app_url + "?scheme=hash&text=the%20cat%20sat")
    page.wait_for_function(f"() => {SCREEN}.querySelector('.view-decide .note').textContent.includes('fixed hash')")
    note = page.evaluate(f"() => {SCREEN}.querySelector('.view-decide .note').textContent")
    assert "there are no scores" in note and "each weighted 1/2" in note
    lit = page.evaluate(f"() => [...{SCREEN}.querySelectorAll('.view-decide .col.on')].map(c => "
                        f"Number(c.querySelector('.light').textContent))")
    tid = get_tokenizer().encode("the cat sat")[0]           # token 0 is selected
    assert sorted(lit) == sorted(hash_scores(torch.tensor([tid]), 8).topk(2).indices[0].tolist())
    assert [e for e in errors if not any(i in e for i in IGNORED)] == []


def test_the_app_draws_random_routing_again_at_every_routing_and_remembers_hash_routing():
    from app.state import RouterState

    state = RouterState()
    state.scheme = "random"
    a, b = state.route(), state.route()
    assert a is not b and not torch.equal(a.routings[0].indices, b.routings[0].indices)
    state.scheme = "hash"
    assert state.route() is state.route()             # repeatable: one routing per text, shared by the class
