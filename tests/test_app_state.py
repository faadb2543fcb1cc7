"""The dashboard state on its own: plain Python, no server, no browser."""
import html

import pytest

from app.state import LIVE_TOKENS, MAX_TEXT_CHARS, RouterState, catalog, examples
from app.views.panels import balance_table, counters, published_table, token_detail, visible
from app.views.screen import screen_data


@pytest.fixture
def state():
    s = RouterState(text="def add(a, b):\n    return a + b  # 42")
    s.route()
    return s


def test_state_imports_no_panel_or_bokeh():
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path("app/state.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"panel", "bokeh"}


def test_routes_the_text_with_the_trained_settings(state):
    res = state.result
    assert res is not None and state.error == ""
    assert "".join(t.text for t in res.tokens) == state.text
    assert state.scheme == "softmax_topk" and state.top_k == 2
    assert len(res.routings) == 4 and res.routings[0].n_experts == 8


def test_changing_k_and_n_changes_the_routing_and_the_counters(state):
    k2 = state.result
    state.top_k = 4
    state.route()
    k4 = state.result
    assert k4.routings[0].indices.shape[1] == 4
    assert k4.params.active_per_token > k2.params.active_per_token and k4.params.total == k2.params.total
    state.n_experts = 16
    state.route()
    n16 = state.result
    assert n16.routings[0].n_experts == 16 and n16.params.total > k4.params.total
    state.top_k = 2
    state.route()
    # same expert width: active stays (almost) equal while total grows; only the router widens
    assert abs(state.result.params.active_per_token - k2.params.active_per_token) <= 4 * 128 * 8


def test_model_change_resets_to_its_trained_routing_and_badge_is_honest():
    s = RouterState(text="hello world")
    s.balancing = "Switch top-1"
    assert s.scheme == "switch" and s.capacity_factor == pytest.approx(1.25)
    assert s.badge()["level"] == "ok"
    s.scheme = "softmax_topk"
    b = s.badge()
    assert b["level"] == "warn" and "Differs from training" in " ".join(b["lines"])
    s.balancing = "untrained"
    assert "random" in " ".join(s.badge()["lines"]).lower()


def test_k_is_clamped_when_n_shrinks():
    s = RouterState(text="hello")
    s.n_experts = 16
    s.top_k = 12
    s.n_experts = 4
    assert s.top_k == 4 and s.param.top_k.bounds == (1, 4)


def test_bad_input_sets_an_error_and_keeps_the_last_result(state):
    good = state.result
    state.text = ""
    assert state.route() is None
    assert "empty" in state.error and state.result is good
    state.text = "\ud800 lone surrogate"
    assert state.route() is None and "surrogate" in state.error and state.result is good
    state.text = "fine again"
    assert state.route() is not None and state.error == ""


def test_huge_paste_is_truncated_with_a_notice():
    s = RouterState(text="7 " * 300_000)
    res = s.route()
    assert len(res.tokens) == LIVE_TOKENS and res.truncated
    assert "first" in s.notice
    assert len("7 " * 300_000) > MAX_TEXT_CHARS


def test_catalog_and_examples():
    names = {m["name"] for m in catalog()}
    assert {"moe-n8", "moe-n8-nobalance", "moe-n8-untrained"} <= names
    assert len(examples()) == 5


def test_views_escape_user_text():
    s = RouterState(text='<img src=x onerror="alert(1)"><script>alert(2)</script>')
    s.route()
    detail = token_detail(s.result, [0], 0)
    assert "<img" not in detail and "<script" not in detail
    assert html.escape("<") in visible("<")
    data = screen_data(s.result, s.model)
    assert "".join(data["tokens"]) == s.text  # raw text goes to the JS view, which only sets textContent
    assert len(data["layers"]) == len(s.result.routings) and len(data["layers"][0]["top"]) == len(s.result.tokens)


def test_panels_show_real_numbers(state):
    res = state.result
    table = balance_table(res, [0, 1])
    assert "Load-balance loss" in table and "Layer 1" in table and "Jain" in table
    pairs = len(res.routings) * res.routings[0].n_experts
    assert "Expert coverage" in table and f"of {pairs}" in table or f"all {pairs} used" in table
    c = counters(res, state.model.config)
    assert f"{res.params.total:,}" in c and f"{res.params.active_per_token:,}" in c
    p = published_table()
    assert "Mixtral 8x7B" in p and "DeepSeek-V3" in p
