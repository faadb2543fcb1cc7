"""Hostile input through the API, the app state and the CLI: a clear message or a correct result,
never a traceback, never a corrupted state; the next valid request always works."""
import itertools
import json
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from app.state import RouterState
from moe_core.model.checkpoint import load
from moe_core.cli import main
from moe_core.inference import route_text
from moe_core.model.gpt import MoEConfig, MoEGPT
from moe_core.model.layer import MoELayer
from moe_core.model.routing import expert_capacity, route

PAYLOADS = [
    "<script>alert(1)</script>", '<img src=x onerror="alert(1)">', "javascript:alert(1)", "</textarea><b>x</b>",
    "{{7*7}} ${7*7} %s %n", "\x00\x01\x02\x1b[31mred\x1b[0m", "\u202eRTL override\u202c", "\u200f\u200e\u200b",
    "e\u0301\u0301\u0301 combining", "\U0001F469\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466 family",
    "\U0001F1FA\U0001F1F8 flag", "   ", "\n\n\n", "\t", "a", "7", "\ufeffBOM", "\uffff\ufffe", "مرحبا بالعالم",
    "שלום עולם", "日本語のテキスト", "Ωμέγα", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "x" * 5000, "1" * 3000, "def f():\n\treturn None",
    "\r\n\r\n", "\\x00\\u0000", "' OR 1=1 --", "../../etc/passwd",
]
BAD_TEXT = ["", "\ud800", "abc\udfffdef"]
SCHEMES = ["softmax_topk", "noisy_topk", "switch", "gshard", "expert_choice", "base", "deepseek"]


@pytest.fixture(scope="module")
def model():
    return load("moe-n8")


def cases():
    """About 200 (text, options) pairs: every payload under several schemes and settings."""
    opts = [dict(scheme="softmax_topk", top_k=2), dict(scheme="switch", capacity_factor=0.25),
            dict(scheme="gshard", capacity_factor=4.0), dict(scheme="expert_choice", capacity_factor=1.0),
            dict(scheme="deepseek", top_k=8), dict(scheme="base"), dict(scheme="noisy_topk", top_k=1)]
    return list(itertools.product(PAYLOADS, opts))


@pytest.mark.parametrize("text, opts", cases()[:210])
def test_api_routes_or_refuses_clearly(model, text, opts):
    res = route_text(model, text, **opts, truncate=True)
    assert res.tokens and "".join(t.text for t in res.tokens) == text[: res.tokens[-1].end]
    for t in res.tokens:
        assert text[t.start:t.end] == t.text
    json.dumps(res.to_json(model), allow_nan=False)   # serialisable, no NaN
    for r in res.routings:
        if r.capacity is not None:
            assert int(r.load.max()) <= r.capacity


@pytest.mark.parametrize("text", BAD_TEXT)
def test_api_refuses_bad_text_with_a_value_error(model, text):
    with pytest.raises(ValueError) as e:
        route_text(model, text)
    assert str(e.value) and "Traceback" not in str(e.value)


@pytest.mark.parametrize("opts, message", [
    (dict(scheme="magic"), "scheme"), (dict(top_k=0), "k"), (dict(top_k=9), "k"), (dict(top_k=2.5), "k"),
    (dict(scheme="switch", capacity_factor=-1.0), "capacity"), (dict(scheme="switch", capacity_factor=float("nan")),
                                                               "capacity"),
    (dict(scheme="switch", capacity_factor="big"), "capacity"),
    (dict(scheme="switch", capacity_factor=1e308), "capacity"), (dict(top_k=-1), "k"),
    (dict(max_tokens=-1, truncate=True), "max_tokens"), (dict(max_tokens=0), "max_tokens"),
])
def test_api_refuses_bad_options(model, opts, message):
    with pytest.raises(ValueError, match=message):
        route_text(model, "hello world", **opts)


# ----------------------------------------------------------------------------- the Python API: layer, routing, model
# Every hostile call raises ValueError with a sentence saying what was expected: never a raw PyTorch, NumPy or
# Python error, and never a silent wrong result (NaN or inf out of finite input, an option ignored).

LAYERS = {}


def layer_for(scheme="softmax_topk"):
    if scheme not in LAYERS:
        torch.manual_seed(0)
        LAYERS[scheme] = MoELayer(16, 24, 6, 2, scheme=scheme, n_shared=1)
    return LAYERS[scheme]


X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
L6 = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("call, message", [
    # the input: type, dtype, device, shape
    (lambda L: L(X.long()), r"floating-point input \(float32, float16, bfloat16 or float64\), got torch.int64"),
    (lambda L: L(X.int()), "floating-point input"), (lambda L: L(X > 0), "floating-point input"),
    (lambda L: L(X.to(torch.complex64)), "floating-point input"), (lambda L: L(X.to(torch.uint8)), "floating-point"),
    (lambda L: L(X.numpy()), r"expects a torch tensor .* got ndarray \(torch.from_numpy"),
    (lambda L: L(X.tolist()), "expects a torch tensor"), (lambda L: L(None), "expects a torch tensor"),
    (lambda L: L(torch.randn(4, 8)), r"expects \[B, T, 16\] or \[T, 16\], got \(4, 8\)"),
    (lambda L: L(torch.randn(1, 2, 3, 16)), "expects"), (lambda L: L(torch.tensor(1.0)), "expects"),
    (lambda L: L(torch.empty(4, 16, device="meta")), "meta tensors"),
    (lambda L: L.route(X.numpy()), "expects a torch tensor"), (lambda L: L.route(X[None]), "expects"),
    (lambda L: L(X[:0]), "no tokens"),
    # the values: NaN or infinity, and finite ones too large for a finite result
    (lambda L: L(torch.full((4, 16), float("nan"))), "NaN or infinity"),
    (lambda L: L(torch.full((4, 16), float("-inf"))), "NaN or infinity"),
    (lambda L: L(torch.full((4, 16), 1e30)), "far too large"), (lambda L: L(torch.full((4, 16), 3e38)), "far too large"),
    (lambda L: L(torch.full((4, 16), -3e38)), "far too large"),
    (lambda L: L(torch.full((4, 16), 1e300, dtype=torch.float64)), "beyond float32's range"),
    (lambda L: L(torch.full((4, 16), 6e4, dtype=torch.float16)), r"output overflowed \(inf or NaN in torch.float16\)"),
    # top-k, capacity and the schemes' options, per call and at construction
    (lambda L: L(X, top_k=0), "top-k must be between 1 and N = 6"), (lambda L: L(X, top_k=-1), "top-k"),
    (lambda L: MoELayer(16, 24, 6, 0), "top-k must be between 1 and N = 6"),
    (lambda L: L(X, scheme="switch", capacity_factor=1e308), r"capacity factor must be a number in \(0, 64\]"),
    (lambda L: MoELayer(16, 24, 6, scheme="switch", capacity_factor=1e308), "capacity factor"),
    (lambda L: L(X, group_size="a"), "group_size .* must be a whole number >= 1, got 'a'"),
    (lambda L: L(X, group_size=0), "group_size"), (lambda L: MoELayer(16, 24, 6, 2, group_size=-1), "group_size"),
    (lambda L: MoELayer(16, 24, 6, 2, group_size="a"), "group_size"),
    (lambda L: L(X, normalize="no"), "normalize must be True or False, got 'no'"),
    (lambda L: MoELayer(16, 24, 6, 2, normalize="no"), "normalize must be True or False"),
    (lambda L: MoELayer(16, 24, 6, 2, scheme="deepseek", normalize=None), "normalize"),
    (lambda L: MoELayer(16, 24, 6, 2, scheme="deepseek", n_groups=4), "must divide"),
    (lambda L: MoELayer(16, 24, 6, 2, scheme="deepseek", scaling="a"), "scaling must be a positive number"),
    (lambda L: MoELayer(16, 24, 6, 2, scheme="noisy_topk", noise_epsilon=-1.0), "noise_epsilon"),
    (lambda L: MoELayer(16, 24, 6, scheme="gshard", batch_prioritized="yes"), "batch_prioritized"),
    (lambda L: MoELayer(16, 24, 1, scheme="gshard", second_policy="all"), "at least 2 experts"),
    (lambda L: L.update_bias(torch.ones(6), "a"), "gamma must be a non-negative number"),
    (lambda L: L.update_bias([1, 2, 3, 4, 5, 6], 0.1), "load must be a tensor"),
    # the routing functions
    (lambda L: route(L6, "softmax_topk", k=0), "top-k must be at least 1"),
    (lambda L: route(L6, "switch", capacity_factor=1e308), r"capacity factor must be a positive number \(at most 64\)"),
    (lambda L: route(L6, "switch", capacity=10**30), "capacity must be at least 1 token slot"),
    (lambda L: route(L6.long(), "softmax_topk", k=2), "floating-point tensor"),
    (lambda L: route(L6.to(torch.complex64), "softmax_topk", k=2), "floating-point tensor"),
    (lambda L: route(L6.numpy(), "softmax_topk", k=2), "2-D tensor"),
    (lambda L: route(torch.full((4, 6), 3e38), "softmax_topk", k=2), "router logits reach 3e\\+38"),
    (lambda L: route(torch.empty(4, 6, device="meta"), "switch"), "meta tensor"),
    (lambda L: route(L6, ["switch"]), "unknown routing scheme"), (lambda L: route(L6, None), "unknown routing scheme"),
    (lambda L: route(L6, "softmax_topk", k=2, normalize="no"), "normalize"),
    (lambda L: route(L6, "deepseek", k=2, scaling=float("inf")), "scaling"),
    (lambda L: route(L6, "deepseek", k=2, n_groups="a"), "n_groups"),
    (lambda L: route(L6, "deepseek", k=2, bias=[0.0] * 6), "bias values .* floating-point tensor"),
    (lambda L: route(L6, "deepseek", k=2, bias=torch.zeros(5)), r"bias values .* shape \(6,\)"),
    (lambda L: route(L6, "deepseek", k=2, bias=torch.full((6,), float("nan"))), "NaN"),
    (lambda L: route(L6, "gshard", batch_prioritized="yes"), "batch_prioritized must be True or False"),
    (lambda L: route(L6, "noisy_topk", k=2, training="no"), "training"),
    (lambda L: route(L6, "noisy_topk", k=2, training=True, noise_logits=[[0.0] * 6] * 4), "noise logits"),
    (lambda L: route(L6, "noisy_topk", k=2, training=True, noise_logits=torch.zeros(4, 5)), "noise logits .* shape"),
    (lambda L: route(L6, "noisy_topk", k=2, training=True, generator="seed"), "torch.Generator"),
    (lambda L: expert_capacity(8, 0), "number of experts must be a whole number from 1"),
    (lambda L: expert_capacity("a", 4), "number of tokens"), (lambda L: expert_capacity(-1, 4), "number of tokens"),
    (lambda L: expert_capacity(8, 4, 1e308), "capacity factor"),
    (lambda L: expert_capacity(8, 4, float("nan")), "capacity factor"),
])
def test_python_api_refuses_hostile_calls_with_a_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(layer_for())
    y, _ = layer_for()(X)                                   # and the layer still works
    assert torch.isfinite(y).all()


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    return MoEGPT(MoEConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, d_model=16, d_ff=8, n_experts=4))


IDS = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("args, message", [
    (dict(idx=IDS.float()), "idx must be an integer tensor"), (dict(idx=IDS.numpy()), "got ndarray"),
    (dict(idx=IDS.tolist()), "got list"), (dict(idx=IDS[0]), r"got a torch.int64 tensor of shape \(5,\)"),
    (dict(idx=IDS.bool()), "integer tensor"), (dict(idx=IDS.to("meta")), "is on meta but the model is on cpu"),
    (dict(idx=torch.full((1, 3), 50)), "values from 0 to 49, got values from 50 to 50"),
    (dict(idx=torch.full((1, 3), -1)), "values from 0 to 49"),
    (dict(targets=IDS[:, :3]), r"shape of idx \(2, 5\)"), (dict(targets=IDS.float()), "targets"),
    (dict(targets=torch.full((2, 5), 50)), "targets .* values from -1 to 49"),
    (dict(targets=torch.full((2, 5), -2), return_logits=False), "targets"),
    (dict(mask=torch.ones(2, 3, dtype=torch.bool)), r"mask must be a bool tensor \[B, T\] = \[2, 5\]"),
    (dict(mask=torch.ones(2, 5)), "mask"), (dict(request="switch"), "request must be a RoutingRequest"),
])
def test_model_refuses_bad_token_ids_targets_and_masks(tiny_gpt, args, message):
    args = {"idx": IDS, **args}
    with pytest.raises(ValueError, match=message):
        tiny_gpt(**args)
    assert torch.isfinite(tiny_gpt(IDS, IDS).loss)


FLOAT_DTYPES = {torch.float16: 16, torch.bfloat16: 32, torch.float32: 32, torch.float64: 64}  # hypothesis width


def finite_tensor(data, dtype, rows, cols):
    """[rows, cols] finite values of `dtype`, all within a drawn bound: of order 1 up to the dtype's largest."""
    bound = min(data.draw(st.sampled_from([1.0, 2.0**14, 2.0**60, 2.0**100, math.inf])), torch.finfo(dtype).max)
    values = data.draw(st.lists(st.floats(-bound, bound, allow_nan=False, allow_infinity=False,
                                          width=FLOAT_DTYPES[dtype]), min_size=rows * cols, max_size=rows * cols))
    t = torch.tensor(values, dtype=torch.float64).to(dtype).view(rows, cols)
    assume(torch.isfinite(t).all())                        # (a float32 value can round to inf in bfloat16)
    return t


@settings(max_examples=80, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(list(FLOAT_DTYPES)), scheme=st.sampled_from(SCHEMES),
       rows=st.integers(1, 5))
def test_any_finite_layer_input_gives_a_finite_output_in_its_dtype_or_a_value_error(data, dtype, scheme, rows):
    x = finite_tensor(data, dtype, rows, 16)
    try:
        y, r = layer_for(scheme)(x)
    except ValueError as e:
        assert str(e)
        return
    assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
    assert torch.isfinite(r.weights).all() and all(torch.isfinite(v) for v in r.aux.values())


@settings(max_examples=80, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(list(FLOAT_DTYPES)), scheme=st.sampled_from(SCHEMES),
       rows=st.integers(1, 6))
def test_any_finite_router_logits_give_a_finite_routing_or_a_value_error(data, dtype, scheme, rows):
    logits = finite_tensor(data, dtype, rows, 4)
    try:
        r = route(logits, scheme, k=2 if scheme in ("softmax_topk", "noisy_topk", "deepseek") else None)
    except ValueError as e:
        assert str(e)
        return
    assert torch.isfinite(r.weights).all() and torch.isfinite(r.probs).all()
    assert all(torch.isfinite(v) for v in r.aux.values())


def test_app_state_survives_every_payload_and_bad_setting():
    s = RouterState(text="warm up")
    s.route()
    for text in PAYLOADS + BAD_TEXT + ["7 " * 600_000]:
        s.text = text
        good = s.result
        res = s.route()
        if res is None:
            assert s.error and s.result is good            # message shown, last good result kept
        else:
            assert s.error == "" and s.result is res
    for name, bad in [("top_k", 0), ("top_k", 99), ("capacity_factor", -1), ("capacity_factor", "x"),
                      ("scheme", "magic"), ("n_experts", 7), ("layer", 9), ("balancing", "imaginary")]:
        before = getattr(s, name)
        with pytest.raises(ValueError):
            setattr(s, name, bad)
        assert getattr(s, name) == before
    s.text = "the next valid request works"
    assert s.route() is not None and s.error == ""


@pytest.mark.parametrize("text", ["<script>alert(1)</script>", "\x00\x1b[2J", "\u202eevil", "   "])
def test_cli_routes_payloads_as_data(text, capsys):
    assert main(["route", text, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "".join(t["text"] for t in out["tokens"]) == text
