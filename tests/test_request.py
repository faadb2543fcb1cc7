"""One RoutingRequest: made and checked once, carried from the URL, CLI and UI down to every MoE layer."""
from __future__ import annotations

import pytest
import torch

from moe_core.inference import route_text
from moe_core.model import request as request_mod
from moe_core.model.checkpoint import load
from moe_core.model.request import RoutingRequest, resolve

TEXT = "def f(x):\n    return x + 1  # the same text every time"


@pytest.fixture(scope="module")
def model():
    return load("moe-n8")


def test_make_fills_the_models_defaults_and_leaves_what_the_scheme_does_not_use(model):
    assert RoutingRequest.make(model.config) == RoutingRequest("softmax_topk", 2)
    assert RoutingRequest.make(model.config, "switch") == RoutingRequest("switch", None, 1.0)   # the scheme's default
    assert RoutingRequest.make(model.config, "expert_choice", capacity_factor=2) == RoutingRequest("expert_choice", None, 2.0)
    assert RoutingRequest.make(model.config, "switch", top_k=1).top_k is None       # Switch's fixed k is not a choice
    r = RoutingRequest.make(model.config, "deepseek", 3, disabled_experts={2: [5, 1, 5]})
    assert r.disabled(2) == (1, 5) and r.disabled(0) == ()
    assert r.as_dict() == {"scheme": "deepseek", "top_k": 3}
    # equal requests are one cache key
    assert len({RoutingRequest.make(model.config), RoutingRequest.make(model.config, top_k=2)}) == 1


@pytest.mark.parametrize("choices, message", [
    (dict(top_k=0), "top-k must be between 1 and N = 8"),
    (dict(top_k=9), "top-k must be between 1 and N = 8"),
    (dict(top_k=2.0), "top-k must be between 1 and N = 8"),
    (dict(top_k=True), "top-k must be between 1 and N = 8"),
    (dict(scheme="switch", top_k=2), "always uses 1 expert"),
    (dict(scheme="expert_choice", top_k=2), "has no top-k"),
    (dict(capacity_factor=1.0), "has no capacity"),
    (dict(scheme="switch", capacity_factor=-1), r"capacity factor must be a number in \(0, 64\]"),
    (dict(scheme="switch", capacity_factor="abc"), "capacity factor must be a number"),
    (dict(scheme="switch", capacity_factor=float("nan")), "capacity factor must be a number"),
    (dict(scheme=""), "unknown routing scheme"),
    (dict(scheme="bogus"), "unknown routing scheme"),
    (dict(disabled_experts=[0]), "must be a dict"),
    (dict(disabled_experts={9: [0]}), "layer 9 does not exist"),
    (dict(disabled_experts={0: [8]}), "expert 8 does not exist"),
    (dict(disabled_experts={0: "01"}), "list of expert numbers"),
    (dict(disabled_experts={0: list(range(7))}), "7 of 8 experts are switched off"),
])
def test_every_bad_choice_gets_one_clear_sentence(model, choices, message):
    with pytest.raises(ValueError, match=message):
        RoutingRequest.make(model.config, **choices)


def test_a_request_is_checked_once_on_its_way_down(model, monkeypatch):
    """route_text makes the request once; the model and every layer take it as it is."""
    made = []
    real = RoutingRequest.make.__func__

    def counting(cls, *a, **kw):
        made.append(a)
        return real(cls, *a, **kw)

    monkeypatch.setattr(request_mod.RoutingRequest, "make", classmethod(counting))
    route_text(model, TEXT, scheme="switch", capacity_factor=0.5)
    assert len(made) == 1
    req = request_mod.RoutingRequest.make(model.config, "switch", capacity_factor=0.5)
    made.clear()
    route_text(model, TEXT, req)
    assert made == []


def test_the_request_routes_every_layer_the_way_keywords_do(model):
    req = RoutingRequest.make(model.config, "switch", capacity_factor=0.5)
    a, b = route_text(model, TEXT, req), route_text(model, TEXT, scheme="switch", capacity_factor=0.5)
    assert a.request == b.request == req and a.loss == b.loss
    assert all(torch.equal(x.indices, y.indices) for x, y in zip(a.routings, b.routings))
    assert all(r.capacity == a.routings[0].capacity for r in a.routings) and a.routings[0].dropped.any()
    # a lone layer makes its request with the same function
    layer = model.model.blocks[0].moe
    h = torch.randn(40, model.config.d_model)
    assert torch.equal(layer.route(h, req).indices, layer.route(h, scheme="switch", capacity_factor=0.5).indices)
    with pytest.raises(ValueError, match="not both"):
        route_text(model, TEXT, req, top_k=2)
    with pytest.raises(ValueError, match="must be a RoutingRequest"):
        resolve(model.config, {"scheme": "switch"})
