"""Classroom features without a browser: share links, lessons, the router walkthrough, compare mode."""
from __future__ import annotations

import pytest
import torch

from app.dashboard import Dashboard
from app.lessons import HIGHLIGHTS, LessonState, fill, lesson_numbers, lessons, markdown_safe, parse_lesson
from app.share import TABS, apply_to_state, parse_query, share_url, state_query
from app.state import RouterState, examples
from moe_core.model.checkpoint import load
from moe_core.analysis.compare import compare_results
from moe_core.analysis.explain import router_walkthrough
from app.views.walkthrough import walkthrough_html
from moe_core.inference import route_text
from moe_core.model.routing import hash_scores

CODE = "def f(x):\n    return 42 + x  # the answer"


# -- share links ---------------------------------------------------------------------------


def test_a_link_round_trips_the_whole_state():
    s = RouterState()
    apply_to_state(s, parse_query({"model": [b"moe-n8-nobalance"], "scheme": [b"gshard"], "cf": [b"1.5"],
                                   "layer": [b"2"], "text": ["Hello <b>world</b> 123".encode()],
                                   "token": [b"3"]})[0])
    q = state_query(s, tab="compare", hide=["controls"])
    settings, page, msgs = parse_query({k: [v.encode()] for k, v in q.items()})
    assert msgs == []
    t = RouterState()
    apply_to_state(t, settings)
    for name in ("n_experts", "balancing", "scheme", "capacity_factor", "layer", "text", "selected_token"):
        assert getattr(t, name) == getattr(s, name), name
    assert page == {"tab": "compare", "hide": ["controls"]}
    assert t.model_info["name"] == "moe-n8-nobalance"


def test_an_example_text_travels_by_name_and_k_survives_the_model_defaults():
    s = RouterState(text=examples()["Python code"])
    s.top_k = 4
    q = state_query(s)
    assert q["example"] == "Python code" and "text" not in q and q["top_k"] == "4"
    t = RouterState()
    apply_to_state(t, parse_query(q)[0])
    assert t.text == examples()["Python code"] and t.top_k == 4


@pytest.mark.parametrize("args, fragment", [
    ({"top_k": "abc"}, "top_k='abc' is not a whole number"),
    ({"top_k": "99"}, "top_k='99' is outside 1\u20138"),
    ({"n": "5"}, "no model with 5 experts"),
    ({"model": "gpt-5"}, "not a model here"),
    ({"scheme": "<svg onload=alert(1)>"}, "not a routing scheme"),
    ({"capacity_factor": "NaN"}, "not a number"),
    ({"capacity_factor": "9"}, "outside 0.25\u20134"),
    ({"layer": "-1"}, "outside 0\u201363"),
    ({"tab": "admin"}, "not a tab"),
    ({"hide": "everything"}, "cannot be hidden"),
    ({"example": "nope"}, "not one of the example texts"),
    ({"<script>": "1"}, "does not know"),
    ({"step": "0"}, "outside 1\u201399"),
])
def test_bad_link_values_are_ignored_with_a_message_and_the_rest_applies(args, fragment):
    args = {**args, "layer": args.get("layer", "1")} if "layer" not in args else args
    settings, page, msgs = parse_query({k: [v.encode()] for k, v in args.items()})
    assert any(fragment in m for m in msgs), msgs
    s = RouterState()
    apply_to_state(s, settings)              # never raises
    assert s.route() is not None and s.error == ""


def test_links_shared_before_the_renaming_still_open_the_same_view():
    """`k` and `cf` were the URL's names for top_k and capacity_factor: old links keep working."""
    old = parse_query({"model": [b"moe-n8-switch"], "k": [b"3"], "cf": [b"1.5"], "scheme": [b"switch"]})
    new = parse_query({"model": [b"moe-n8-switch"], "top_k": [b"3"], "capacity_factor": [b"1.5"], "scheme": [b"switch"]})
    assert old == new and old[0]["top_k"] == 3 and old[0]["capacity_factor"] == 1.5 and old[2] == []
    assert parse_query({"k": [b"abc"]})[2] == ["Link setting top_k='abc' is not a whole number, so it was ignored."]


def test_long_values_are_cut_in_messages_and_text_is_capped():
    settings, _, msgs = parse_query({"k": ["9" * 500], "text": ["a" * 10_000]})
    assert all(len(m) < 300 for m in msgs)
    assert len(settings["text"]) == 2000


def test_a_layer_the_model_lacks_is_reported_when_applied():
    s = RouterState()
    msgs = apply_to_state(s, parse_query({"layer": ["40"]})[0])
    assert s.layer == 0 and "layers 0\u20133" in msgs[0]


def test_share_url_percent_encodes_everything():
    url = share_url("http://host:5006/main?old=1", {"text": "a&b=c <x> \u00e9", "top_k": "2"})
    assert url.startswith("http://host:5006/main?text=") and "&top_k=2" in url and "<" not in url and " " not in url


def test_dashboard_link_button_builds_a_url_that_reopens_the_view():
    d = Dashboard()
    d.page_layout()
    d.state.top_k = 3
    d.show_tab("params")
    d._make_link()
    d.share_hide.value = True                            # the link is made again, for a lesson
    assert d.share_row.visible
    from urllib.parse import parse_qs, urlparse
    q = parse_qs(urlparse(d.share_url.value).query)
    assert q["top_k"] == ["3"] and q["tab"] == ["params"] and q["hide"] == ["controls"]
    assert set(TABS) >= set(d.tab_names)


# -- lessons -------------------------------------------------------------------------------


def test_there_are_at_least_five_lessons_and_every_step_is_valid():
    ls = lessons()
    assert len(ls) >= 5
    for lesson in ls.values():
        assert lesson.steps and lesson.title
        for step in lesson.steps:
            assert step.tab in TABS and (step.highlight is None or step.highlight in HIGHLIGHTS)
            assert parse_query(step.settings)[2] == []


def test_walking_a_lesson_sets_up_the_app_and_quotes_live_numbers():
    s = RouterState()
    L = LessonState(s)
    L.start("total-vs-active")
    s.route()
    text_k2 = fill(L.current_step.body, lesson_numbers(s))
    assert f"{s.result.params.active_per_token / 1e6:.2f} M" in text_k2
    L.next()
    assert s.top_k == 4
    s.route()
    nums = lesson_numbers(s)
    assert nums["k"] == "4" and nums["active"] == f"{s.result.params.active_per_token / 1e6:.2f} M"
    L.next()
    assert s.n_experts == 32 and s.top_k == 2
    assert L.next() is not None and L.next() is None          # 4 steps, then the end
    assert L.prev() is not None and L.step == 2


def test_jumping_into_a_lesson_applies_every_earlier_step():
    s = RouterState()
    L = LessonState(s)
    L.start("capacity", 1)
    assert s.model_info["name"] == "moe-n8-switch" and s.capacity_factor == 0.5
    s.route()
    nums = lesson_numbers(s)
    r = s.result.routings[0]
    assert nums["dropped"] == str(int(r.dropped.any(1).sum())) and int(nums["dropped"]) > 0


def test_lesson_numbers_escape_the_users_token():
    s = RouterState(text="<img src=x onerror=alert(1)> *boom*")
    s.route()
    nums = lesson_numbers(s)
    assert "<" not in nums["token_text"] and "<" not in markdown_safe("<b>")
    assert fill("{token_text} {nope}", {"token_text": "x"}) == "x ?"


def test_bad_lesson_files_and_requests_are_explained():
    with pytest.raises(ValueError, match="must start with"):
        parse_lesson("x", "no title\n---\n")
    with pytest.raises(ValueError, match="unknown tab"):
        parse_lesson("x", '# T\n---\n<!-- {"tab": "nowhere"} -->\n## S\nbody')
    with pytest.raises(ValueError, match="not a model"):
        parse_lesson("x", '# T\n---\n<!-- {"set": {"model": "nope"}} -->\n## S\nbody')
    with pytest.raises(ValueError, match="no lesson"):
        LessonState(RouterState()).start("nope")


def test_dashboard_lesson_moves_tabs_highlights_and_keys():
    d = Dashboard()
    d.page_layout()
    d._start_lesson("total-vs-active")
    assert d.lesson_bar.visible and d.tabs.value == "router"
    assert d.screen.focus == "counters"                  # the counters on the first screen are framed
    assert not d.input.visible and not d.intro.visible    # the lesson card takes their place, above the screen
    assert d.page_control.lesson_active
    d.page_control.next_presses += 1                     # the Right-arrow key in the browser
    assert d.lessons.step == 1 and d.state.top_k == 4
    d.page_control.prev_presses += 1
    assert d.lessons.step == 0
    d._start_lesson("top-k-step-by-step")
    assert d.screen.focus == "decide" and d.tabs.value == "router"
    d._lesson_move(+1)                                   # step 2: the same token inside the router, every number
    assert d.tabs.value == "details" and d.screen.focus == ""
    assert "lesson-focus" in d._cards["walkthrough"].css_classes and "Logits" in d.details.walk.object
    d._stop_lesson()
    assert not d.lesson_bar.visible and not d.page_control.lesson_active and d.input.visible
    assert "lesson-focus" not in d._cards["walkthrough"].css_classes


# -- walkthrough ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["softmax_topk", "switch", "gshard", "expert_choice", "deepseek", "base", "hash",
                                    "random"])
def test_walkthrough_recomputes_the_layer_output_by_hand(scheme):
    m = load("moe-n8")
    torch.manual_seed(0)                      # random routing: the walkthrough and route_text draw alike
    d = router_walkthrough(m, CODE, 5, 1, scheme=scheme)
    assert d["max_abs_diff"] < 1e-4
    torch.manual_seed(0)
    res = route_text(m, CODE, scheme=scheme)
    r = res.routings[1]
    assert d["experts"] == [e for e in r.indices[5].tolist() if e >= 0]
    assert d["probs"] == pytest.approx(r.probs[5].tolist(), abs=1e-6)
    if scheme == "softmax_topk":
        assert sum(d["weights"]) == pytest.approx(1.0, abs=1e-5)
        assert torch.tensor(d["logits"]).softmax(0).tolist() == pytest.approx(d["probs"], abs=1e-5)


def test_walkthrough_says_a_hash_router_has_no_scores():
    m = load("moe-n8")
    d = router_walkthrough(m, CODE, 5, 1, scheme="hash")
    assert d["max_abs_diff"] < 1e-4 and d["score"] == "none" and d["weights"] == [0.5, 0.5]
    tid = route_text(m, CODE).tokens[5].id
    assert sorted(d["experts"]) == sorted(hash_scores(torch.tensor([tid]), 8).topk(2).indices[0].tolist())
    html = walkthrough_html(d)
    assert "ignores the router's logits" in html and "a fixed hash of the token id (k = 2)" in html
    assert "softmax" not in html and "Renormalise" not in html


def test_walkthrough_rejects_bad_requests():
    m = load("moe-n8")
    with pytest.raises(ValueError, match="token must be"):
        router_walkthrough(m, "hi", 99, 0)
    with pytest.raises(ValueError, match="layer must be"):
        router_walkthrough(m, "hi", 0, 7)
    with pytest.raises(ValueError, match="empty"):
        router_walkthrough(m, "", 0, 0)


# -- compare -------------------------------------------------------------------------------


def test_compare_same_weights_counts_agreement_and_identity_is_perfect():
    m = load("moe-n8")
    a = route_text(m, CODE)
    rows = compare_results(a, route_text(m, CODE), same_weights=True)
    assert all(r["top1_agree"] == 1.0 and r["tv_distance"] < 1e-6 and r["partition_nmi"] == pytest.approx(1.0)
               for r in rows)
    b = route_text(m, CODE, top_k=1)
    rows = compare_results(a, b, same_weights=True)
    assert rows[0]["top1_agree"] == 1.0                  # layer 0 sees the same input: same first choice
    assert all(r["tv_distance"] > 0.05 for r in rows)    # but the weights change (one expert gets all)


def test_compare_different_models_uses_number_free_measures():
    a = route_text(load("moe-n8"), CODE)
    b = route_text(load("moe-n8-nobalance"), CODE)
    rows = compare_results(a, b, same_weights=False)
    assert "top1_agree" not in rows[0]
    assert all(0 <= r["partition_nmi"] <= 1 for r in rows)
    assert sum(rows[0]["sorted_share_b"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same text"):
        compare_results(a, route_text(load("moe-n8"), "other text"), same_weights=True)


def test_compare_view_routes_b_only_while_shown_and_reports_bad_b():
    d = Dashboard()
    d.page_layout()
    assert not hasattr(d, "compare")                     # built when first opened, not with the session
    d.show_tab("compare")
    c = d.compare
    assert c.shown and "moe-n8-nobalance" in c.summary.object
    c._copy_a()
    c.k_b.value = 1
    c._on_b()
    assert "k = 1" in c.summary.object and "same first choice" in c.table.object
    d.show_tab("router")
    before = c.summary.object
    d.state.top_k = 3                                    # A changes while Compare is hidden
    assert c.summary.object == before and c._stale
    d.show_tab("compare")
    assert "k = 3" in c.summary.object


# -- accessibility: the heatmap as a table, escaping ------------------------------------------


def test_routing_table_lists_every_token_and_choice_escaped():
    from app.views.walkthrough import routing_table_html, walkthrough_html

    s = RouterState(text="<script>x</script> 1 2 3")
    res = s.route()
    out = routing_table_html(res, [0, 1])
    assert "<script>" not in out and "&lt;script&gt;" in out.replace("\u2423", " ") or "&lt;" in out
    assert out.count("<tr>") == len(res.tokens) + 1                 # header + one row per token
    r = res.routings[1]
    assert f"{r.weights[0, 0].item():.2f}" in out
    d = router_walkthrough(s.model, s.text, 0, 0)
    html_out = walkthrough_html(d)
    assert "<script>" not in html_out and "largest difference" in html_out


def test_dashboard_table_toggle_and_presenter_mode():
    d = Dashboard()
    d.page_layout()
    assert d.details is None                                        # built when the tab is first opened
    d.show_tab("details")
    t = d.details
    assert not t.table_view.visible
    t.as_table.value = True
    assert t.table_view.visible and "the heatmap as a table" in t.table_view.object
    d.state.top_k = 3                                               # the table follows the routing
    assert t.table_view.object.count("</span> ") >= 3 * len(d.state.result.tokens)
    d.presenter.value = True
    assert d.page_control.presenter


def test_an_old_link_showing_every_layer_still_opens():
    """Links made before the one-screen Router carried layer=all: they open on layer 0, with no complaint."""
    settings, _, msgs = parse_query({"layer": ["all"], "k": ["3"]})
    s = RouterState()
    assert msgs == [] and apply_to_state(s, settings) == []
    assert s.layer == 0 and s.top_k == 3
