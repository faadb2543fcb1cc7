"""Hostile input through the API, the app state and the CLI: a clear message or a correct result,
never a traceback, never a corrupted state; the next valid request always works."""
import itertools
import json

import pytest

from app.state import RouterState
from moe_core.model.checkpoint import load
from moe_core.cli import main
from moe_core.inference import route_text

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
])
def test_api_refuses_bad_options(model, opts, message):
    with pytest.raises(ValueError, match=message):
        route_text(model, "hello world", **opts)


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
