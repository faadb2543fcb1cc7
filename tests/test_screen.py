"""The first screen's record (app/views/screen.py) and the session plumbing behind it, without a browser."""
from __future__ import annotations

import json

import pytest

from app.dashboard import Dashboard, k_fixed_text
from app.state import RouterState, corpus_profile, routed
from app.views.screen import per_token_text, screen_data, screen_json
from moe_core.model.checkpoint import load

TEXT = "def add(a, b):\n    return a + b  # 12345"


def state(**kw) -> RouterState:
    s = RouterState(text=TEXT, **kw)
    s.route()
    return s


def test_the_record_is_the_routing_every_layer_and_token():
    s = state()
    d = screen_data(s.result, s.model, corpus_profile(s.model))
    assert d["tokens"] == [t.text for t in s.result.tokens] and d["n"] == 8 and d["k"] == 2
    assert len(d["layers"]) == len(s.result.routings)
    for L, r in zip(d["layers"], s.result.routings):
        assert L["top"] == [[e for e in row if e >= 0] for row in r.choices.tolist()]
        assert all(len(row) == 2 for row in L["top"])                            # k = 2 experts for every token
        assert all(sum(w) == pytest.approx(1000, abs=2) for w in L["w"])          # renormalised weights, thousandths
        assert [row[0] for row in L["p"]] == [round(p * 1000) for p in r.probs[:, 0].tolist()]
        assert sum(L["corpus"]) == pytest.approx(1000, abs=8)                    # held-out shares of all choices
    assert d["counters"]["total"] == s.result.params.total
    assert d["counters"]["active"] == s.result.params.active_per_token
    assert d["corpus_as_now"]                               # the held-out marks show this very routing
    for change in ({"scheme": "hash"}, {"top_k": 4}):      # another routing: the marks are the model's own
        s.param.update(**change)
        s.route()
        assert not screen_data(s.result, s.model, corpus_profile(s.model))["corpus_as_now"]


def test_k_4_gives_every_token_four_choices_and_a_bigger_active_count():
    s2, s4 = state(), state()
    s4.top_k = 4
    s4.route()
    d2, d4 = (screen_data(s.result, s.model) for s in (s2, s4))
    # layer 0 sees the same input: its top 2 stay and two more light up (deeper layers' inputs change with k)
    assert all(len(a) == 4 and a[:2] == b for a, b in zip(d4["layers"][0]["top"], d2["layers"][0]["top"]))
    assert all(len(a) == 4 for a in d4["layers"][3]["top"])
    assert d4["counters"]["active"] > d2["counters"]["active"] and d4["counters"]["total"] == d2["counters"]["total"]


@pytest.mark.parametrize("scheme, says", [
    ("softmax_topk", "k = 2 experts per token"),
    ("switch", "1 expert per token (fixed by the scheme)"),
    ("base", "1 expert per token (fixed by the scheme)"),
    ("gshard", "2 experts per token (fixed by the scheme)"),
    ("expert_choice", "experts choose tokens: "),
])
def test_what_k_is_under_each_scheme_is_said_the_same_by_the_control_and_the_counter(scheme, says):
    s = state()
    s.scheme = scheme
    s.route()
    text = per_token_text(s.result)
    assert text.startswith(says)
    d = screen_data(s.result, s.model)
    assert d["per_token"] == text                                       # the active counter's line
    if scheme == "expert_choice":                                       # the average, measured on this text
        assert f"{s.result.params.experts_per_token:.1f} experts per token on this text" in text
    if scheme != "softmax_topk":                                        # the k control says the same
        assert text in k_fixed_text(s) or k_fixed_text(s).endswith(text)
    if scheme == "switch":
        assert all(len(row) <= 1 for L in d["layers"] for row in L["top"])


def test_deepseek_sends_the_bias_that_shifts_the_choice():
    m = load("moe-n8-bias")
    s = RouterState(text=TEXT)
    s.balancing = "DeepSeek bias"
    s.route()
    assert s.scheme == "deepseek"
    d = screen_data(s.result, m)
    biases = [b.expert_bias.tolist() for b in m.model.modules() if hasattr(b, "expert_bias")]
    assert [L["bias"] for L in d["layers"]] == [[round(x * 1000) for x in b] for b in biases]
    assert any(any(x != 0 for x in L["bias"]) for L in d["layers"])


def test_user_text_travels_as_data_only():
    s = RouterState(text='<img src=x onerror="alert(1)"> </script>')
    s.route()
    d = json.loads(screen_json(s.result, s.model))
    assert "".join(d["tokens"]) == s.text            # drawn with textContent in the browser


def test_a_class_routing_the_same_text_shares_one_result_and_one_record():
    a, b = state(), state()
    assert a.result is b.result                       # one routing for every session asking the same
    assert screen_json(a.result, a.model) is screen_json(b.result, b.model)
    b.top_k = 3
    b.route()
    assert b.result is not a.result and b.result.top_k == 3
    long_text = "x " * 3000                           # long texts are routed afresh, not kept
    assert routed(a.model, long_text, a.request()) is not routed(a.model, long_text, a.request())


def test_the_same_error_twice_notifies_twice_and_the_next_valid_change_routes():
    d = Dashboard()
    d.page_layout()
    shown = []
    d.notify = lambda kind, msg: shown.append((kind, msg))
    good = d.state.result
    d.state.text = ""
    d.state.top_k = 3                                 # an empty text again: said again
    assert [k for k, _ in shown] == ["error", "error"] and all("empty" in m for _, m in shown)
    assert d.state.result is good
    d.state.text = "back to routing"
    assert d.state.result is not good and d.state.error == ""
    assert "".join(json.loads(d.screen.data)["tokens"]) == "back to routing"


def test_details_are_built_when_opened_and_drawn_only_while_shown():
    d = Dashboard()
    d.page_layout()
    assert d.details is None
    d.show_tab("details")
    assert d.details is not None and "token 0" in d.details.detail.object.lower()
    d.show_tab("router")
    before = d.details.detail.object
    d.state.selected_token = 3                        # hidden: not redrawn, marked stale
    assert d.details.detail.object == before and d._details_stale
    d.show_tab("details")
    assert "Token 3" in d.details.detail.object and not d._details_stale


def test_a_layer_or_token_the_page_could_not_send_is_put_back():
    d = Dashboard()
    d.page_layout()
    d.screen.layer = 2
    assert d.state.layer == 2
    d.screen.layer = 9                                # the model has layers 0-3
    assert d.state.layer == 2 and d.screen.layer == 2
    d.screen.selected = 3
    assert d.state.selected_token == 3
    d.screen.selected = 10_000                        # past the last token
    assert d.state.selected_token == 3 and d.screen.selected == 3
