"""The quiz: every answer comes from the live model, scoring, validation, and the view without a browser."""
from __future__ import annotations

import dataclasses
import html

import pytest
import torch

import app.quiz as quiz_mod
from app.quiz import (
    DIGITS_TEXT, MATHS_PARAGRAPH, Question, QuizState, apply_setup, fill, parse_choice, parse_number,
    question_bank, route_setup,
)
from app.state import RouterState
from moe_core.data.categories import COARSE_CATEGORIES
from moe_core.model.checkpoint import load
from moe_core.inference import route_text
from moe_core.analysis.metrics import balance_metrics
from moe_core.model.params import count_params


@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test starts and ends with an empty routing cache, so monkeypatches cannot leak."""
    quiz_mod.clear_cache()
    yield
    quiz_mod.clear_cache()


@pytest.fixture(scope="module")
def bank() -> dict[str, Question]:
    return {q.id: q for q in question_bank()}


def solve(q: Question):
    return q.solve(q)


def with_setup(q: Question, **changes) -> Question:
    return dataclasses.replace(q, setup={**q.setup, **changes})


def relabel_first_choices(fn):
    """A route_text that returns the real result with every first choice replaced by fn(token, old)."""
    real = route_text

    def fake(model, text, *a, **kw):
        res = real(model, text, *a, **kw)
        routings = []
        for r in res.routings:
            choices = r.choices.clone()
            choices[:, 0] = torch.tensor([fn(t, int(e)) for t, e in zip(res.tokens, r.choices[:, 0].tolist())])
            routings.append(dataclasses.replace(r, choices=choices))
        return dataclasses.replace(res, routings=routings)

    return fake


# ----------------------------------------------------------------------------- the bank


def test_bank_covers_the_lessons_and_every_question_is_complete(bank):
    assert len(bank) >= 8
    assert {"digits_expert", "total_k", "active_k", "double_n", "nobalance_share", "switch_drops", "ec_zero",
            "topic_or_kind", "deepseek_bias"} <= set(bank)
    for q in bank.values():
        assert {"model", "n_experts", "balancing", "scheme", "top_k", "capacity_factor", "text", "layer"} <= set(q.setup)
        assert q.kind in ("choice", "number") and q.predicts and q.explanation
        if q.kind == "choice":
            assert len(set(q.options)) == len(q.options) >= 2


def test_every_prompt_and_explanation_is_filled_with_live_numbers(bank):
    quiz = QuizState(list(bank.values()))
    for i, q in enumerate(quiz.questions):
        quiz.go(i)
        prompt = quiz.prompt()
        live = quiz.live()
        assert "{" not in prompt and "[missing" not in prompt, q.id
        fb = quiz.check(0)
        assert "{" not in fb.explanation and "[missing" not in fb.explanation and "n/a" not in fb.explanation, q.id
        if q.kind == "choice":
            assert 0 <= live.answer < len(q.options)
            assert fb.answer == q.options[live.answer]
        else:
            assert live.answer >= 0


def test_question_kind_and_options_are_validated():
    with pytest.raises(ValueError, match="kind"):
        Question("x", "t", "p", "essay", "l", {}, solve=lambda q: None)
    with pytest.raises(ValueError, match="2 options"):
        Question("x", "t", "p", "choice", "l", {}, solve=lambda q: None, options=("only",))


# ----------------------------------------------------------------------------- live answers


def test_digits_expert_is_the_real_first_choice_of_the_digits(bank):
    q = bank["digits_expert"]
    res = route_text(load("moe-n8"), DIGITS_TEXT)
    digits = [e for t, e in zip(res.tokens, res.routings[0].choices[:, 0].tolist()) if t.text.isdigit()]
    counts = torch.bincount(torch.tensor(digits), minlength=8)
    live = solve(q)
    assert live.answer == int(counts.argmax()) and live.numbers["n_expert"] == int(counts.max())
    assert live.numbers["n_digits"] == len(digits) > 10


def test_digits_answer_follows_route_text_not_a_constant(bank, monkeypatch):
    q = bank["digits_expert"]
    before = solve(q).answer
    quiz_mod.clear_cache()
    monkeypatch.setattr(quiz_mod, "route_text", relabel_first_choices(lambda t, e: (e + 3) % 8))
    assert solve(q).answer == (before + 3) % 8


def test_digits_answer_changes_with_the_model(bank):
    q = bank["digits_expert"]
    n16 = quiz_mod.make_setup("moe-n16", DIGITS_TEXT)
    live = solve(with_setup(q, **n16))
    res = route_text(load("moe-n16"), DIGITS_TEXT)
    digits = [e for t, e in zip(res.tokens, res.routings[0].choices[:, 0].tolist()) if t.text.isdigit()]
    assert live.answer == int(torch.bincount(torch.tensor(digits), minlength=16).argmax())


def test_active_answer_is_count_params_at_k4(bank):
    q = bank["active_k"]
    model = load("moe-n8")
    expected = count_params(model.model, top_k=4).active_per_token
    assert solve(q).answer == expected
    quiz = QuizState([q])
    assert quiz.check(expected).correct
    assert quiz.check(f"{expected:,}").correct
    assert quiz.check(expected * 1.015).correct               # within the 2% tolerance
    assert not quiz.check(expected * 1.10).correct
    assert not quiz.check(count_params(model.model, top_k=2).active_per_token).correct


def test_total_does_not_follow_k(bank):
    q = bank["total_k"]
    live = solve(q)
    model = load("moe-n8")
    assert live.numbers["total"] == live.numbers["total_k2"] == count_params(model.model, top_k=4).total
    assert q.options[live.answer] == "It stays exactly the same"


def test_double_n_answer_reads_count_params(bank, monkeypatch):
    q = bank["double_n"]
    live = solve(q)
    assert live.numbers["total_big"] == count_params(load("moe-n16").model).total
    assert q.options[live.answer].startswith("Total grows a lot")

    real = count_params

    def fake(model, **kw):     # pretend active parameters also scale with N
        rep = real(model, **kw)
        return dataclasses.replace(rep, active_per_token=rep.active_per_token * rep.n_experts)

    monkeypatch.setattr(quiz_mod, "count_params", fake)
    assert q.options[solve(q).answer] == "Both total and active grow a lot"


def test_nobalance_share_is_the_balance_metric(bank, monkeypatch):
    q = bank["nobalance_share"]
    live = solve(q)
    res = route_text(load("moe-n8-nobalance"), q.setup["text"])
    share = balance_metrics(res.routings[0])["top1_max_share"]
    assert live.numbers["share"] == pytest.approx(share)
    assert live.answer == sum(share >= b for b in quiz_mod.SHARE_BINS)
    quiz_mod.clear_cache()
    monkeypatch.setattr(quiz_mod, "route_text", relabel_first_choices(lambda t, e: 0))   # total collapse
    assert q.options[solve(q).answer] == "Over 60%"
    quiz_mod.clear_cache()
    monkeypatch.setattr(quiz_mod, "route_text", relabel_first_choices(lambda t, e: t.start % 8))  # spread out
    assert solve(q).numbers["share"] < 0.2 and solve(q).answer == 0


def test_switch_drops_are_counted_from_the_routing_and_follow_the_capacity(bank):
    q = bank["switch_drops"]
    live = solve(q)
    res = route_text(load("moe-n8-switch"), q.setup["text"], scheme="switch", capacity_factor=0.5)
    r = res.routings[0]
    assert live.answer == int(r.dropped.any(1).sum()) >= live.numbers["min_dropped"] > 0
    assert live.numbers["capacity"] == r.capacity
    roomy = solve(with_setup(q, capacity_factor=4.0))
    assert roomy.answer < live.answer


def test_expert_choice_zero_experts_follows_the_capacity(bank):
    q = bank["ec_zero"]
    live = solve(q)
    res = route_text(load("moe-n8"), q.setup["text"], scheme="expert_choice", capacity_factor=1.0)
    n_zero = int((res.routings[0].dispatch.sum(1) == 0).sum())
    assert live.numbers["n_zero"] == n_zero
    assert live.answer == (0 if n_zero else 1)
    # capacity factor = N: every expert takes every token, so no token is left out
    full = solve(with_setup(q, capacity_factor=8.0))
    assert full.numbers["n_zero"] == 0 and q.options[full.answer].startswith("No")


def test_topic_or_kind_reads_the_routing(bank, monkeypatch):
    q = bank["topic_or_kind"]
    live = solve(q)
    n = live.numbers
    assert n["kind"] in COARSE_CATEGORIES and 0 < n["kind_share"] <= 1
    if live.answer == 1:
        assert min(n["rate_kind_maths"], n["rate_kind_bio"]) >= 0.5
    # a router that sorted tokens by subject would make it a topic expert
    quiz_mod.clear_cache()
    split = len(MATHS_PARAGRAPH)
    monkeypatch.setattr(quiz_mod, "route_text", relabel_first_choices(lambda t, e: 0 if t.start < split else 1))
    topical = solve(q)
    assert topical.numbers["expert"] == 0 and q.options[topical.answer].startswith("A topic")


def test_deepseek_bias_is_checked_with_and_without_the_bias(bank, monkeypatch):
    q = bank["deepseek_bias"]
    live = solve(q)
    assert live.numbers["n_changed"] > 0 and live.numbers["max_weight_diff"] < 1e-5
    assert q.options[live.answer].startswith("Which experts are chosen")
    assert "2.1.2" in q.source and "2.1.2" in q.explanation
    quiz_mod.clear_cache()
    monkeypatch.setattr(quiz_mod, "_bias_free", lambda model: model)   # no bias removed: nothing changes
    assert q.options[solve(q).answer] == "Nothing on this text"


def test_bias_free_copy_leaves_the_shared_model_alone():
    model = load("moe-n8-bias")
    before = [b.clone() for n, b in model.model.named_buffers() if n.endswith("expert_bias")]
    copy = quiz_mod._bias_free(model)
    assert all(float(b.abs().sum()) == 0 for n, b in copy.model.named_buffers() if n.endswith("expert_bias"))
    after = [b for n, b in model.model.named_buffers() if n.endswith("expert_bias")]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and any(float(b.abs().sum()) > 0 for b in after)


def test_routings_are_cached_for_the_same_model_text_and_settings(bank, monkeypatch):
    calls = []

    def counting(model, text, request):
        calls.append((model.name, request))
        return route_text(model, text, request)

    monkeypatch.setattr(quiz_mod, "route_text", counting)
    q = bank["digits_expert"]
    a, b = route_setup(q.setup), route_setup(q.setup)
    assert a is b and len(calls) == 1
    route_setup({**q.setup, "top_k": 3})
    assert len(calls) == 2


# ----------------------------------------------------------------------------- scoring and input


def test_scoring_next_previous_and_reset(bank):
    quiz = QuizState([bank["digits_expert"], bank["active_k"]])
    right = quiz.live().answer
    fb = quiz.check(right)
    assert fb.correct and quiz.score_text() == "1 / 1" and quiz.feedback is fb
    fb = quiz.check((right + 1) % 8)        # a new answer to the same question replaces the old one
    assert not fb.correct and quiz.score_text() == "0 / 1"
    assert fb.given == f"Expert {(right + 1) % 8}" and fb.answer == f"Expert {right}"
    quiz.check(f"Expert {right}")            # the option's label works too
    quiz.next()
    assert quiz.index == 1 and quiz.feedback is None
    quiz.check("1.4M")
    assert quiz.answered == 2 and quiz.finished
    quiz.previous()
    assert quiz.feedback.question_id == "digits_expert"
    with pytest.raises(ValueError, match="does not exist"):
        quiz.go(5)
    quiz.reset()
    assert (quiz.index, quiz.score, quiz.answered, quiz.feedback, quiz.answers) == (0, 0, 0, None, {})


@pytest.mark.parametrize("text, value", [("1414272", 1414272), ("1,414,272", 1414272), (" 1 414 272 ", 1414272),
                                         ("1.4M", 1.4e6), ("54", 54), ("2e3", 2000), (12, 12), (0.5, 0.5)])
def test_numbers_students_type(text, value):
    assert parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("bad, message", [("", "type a number first"), (None, "type a number first"),
                                          ("abc", "is not a number"), ("1.2.3", "is not a number"),
                                          ("-5", "cannot be negative"), ("nan", "is not a number"),
                                          (float("inf"), "finite"), (True, "type a number"),
                                          ("<b>9</b>", "is not a number")])
def test_bad_numbers_say_why(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_number(bad)


def test_bad_choices_say_why(bank):
    q = bank["ec_zero"]
    assert parse_choice(q, 1) == 1 and parse_choice(q, q.options[0]) == 0
    for bad, message in [(None, "first"), ("", "first"), (7, "0 to 1"), (-1, "0 to 1"), ("Maybe", "one of the 2"),
                         (True, "choose one")]:
        with pytest.raises(ValueError, match=message):
            parse_choice(q, bad)
    quiz = QuizState([q])
    with pytest.raises(ValueError):
        quiz.check("Maybe")
    assert quiz.answered == 0 and quiz.feedback is None          # a bad answer is not scored


def test_fill_never_raises_on_missing_numbers():
    assert fill("{a:,} and {b:.0%} and {c}", {"a": 1234, "b": None}) == "1,234 and n/a and ?"


# ----------------------------------------------------------------------------- router setup


def test_apply_setup_reproduces_the_answer_in_the_router(bank):
    q = bank["digits_expert"]
    state = RouterState()
    state.balancing = "no balancing"            # start somewhere else
    apply_setup(state, q.setup)
    res = state.route()
    digits = [e for t, e in zip(res.tokens, res.routings[0].choices[:, 0].tolist()) if t.text.isdigit()]
    assert int(torch.bincount(torch.tensor(digits), minlength=8).argmax()) == solve(q).answer
    apply_setup(state, bank["switch_drops"].setup)
    assert (state.n_experts, state.balancing, state.scheme, state.capacity_factor, state.layer) == (
        8, "Switch top-1", "switch", 0.5, 0)
    res = state.route()
    assert int(res.routings[0].dropped.any(1).sum()) == solve(bank["switch_drops"]).answer
    apply_setup(state, bank["double_n"].setup)
    assert state.n_experts == 16 and state.top_k == 2


# ----------------------------------------------------------------------------- the view (no browser)


def test_quiz_view_click_through(bank):
    from app.views.quiz import QuizView

    shown = []
    view = QuizView(quiz=QuizState([bank["digits_expert"], bank["active_k"]]), on_show=shown.append)
    view.__panel__()
    assert "Question 1 of 2" in view.header.object and "Score 0 / 0" in view.header.object
    assert view.choices.visible and not view.number.visible and view.choices.value is None
    assert view.show_btn.disabled                        # predict first, then reveal

    view.check_btn.clicks += 1                           # nothing chosen yet
    assert "choose one of the options" in view.last_error.lower() and "role='alert'" in view.error.object
    assert view.quiz.answered == 0

    right = view.quiz.live().answer
    view.choices.value = f"Expert {right}"
    view.check_btn.clicks += 1
    assert view.last_error == "" and "Correct" in view.feedback.object and "Score 1 / 1" in view.header.object
    assert f"Expert {right}" in view.feedback.object and not view.show_btn.disabled
    view.show_btn.clicks += 1
    assert shown == [bank["digits_expert"].setup]

    view.next_btn.clicks += 1
    assert view.quiz.index == 1 and view.number.visible and not view.choices.visible and view.next_btn.disabled
    assert view.feedback.object == "" and "2%" in view.number.name
    view.number.value = "lots"
    view.check_btn.clicks += 1
    assert "is not a number" in view.last_error and view.quiz.answered == 1
    view.number.value = "1,000"
    view.check_btn.clicks += 1
    assert "Not this time" in view.feedback.object and "Score 1 / 2" in view.header.object
    assert f"{count_params(load('moe-n8').model, top_k=4).active_per_token:,}" in view.feedback.object

    view.reset_btn.clicks += 1
    assert view.quiz.index == 0 and "Score 0 / 0" in view.header.object and view.feedback.object == ""


def test_quiz_view_applies_the_setup_to_the_router_state_without_a_callback(bank):
    from app.views.quiz import QuizView

    state = RouterState()
    view = QuizView(quiz=QuizState([bank["ec_zero"]]), state=state)
    view.check(0)
    view.show_in_router()
    assert state.scheme == "expert_choice" and state.text == bank["ec_zero"].setup["text"]


def test_quiz_view_escapes_every_text(bank):
    from app.views.quiz import QuizView, feedback_html

    evil = "<img src=x onerror=alert(1)>"
    q = dataclasses.replace(bank["ec_zero"], title=evil, prompt=evil + " {n_zero}", explanation=evil,
                            options=(evil, "No"), setup={**bank["ec_zero"].setup, "text": evil})
    view = QuizView(quiz=QuizState([q]))
    fb = view.check(evil)
    for pane in (view.header, view.prompt, view.setup):
        assert "<img" not in pane.object and html.escape(evil) in pane.object
    assert "<img" not in feedback_html(fb) and "<img" not in view.feedback.object


def test_warm_fills_the_cache_so_a_new_quiz_routes_nothing(bank, monkeypatch):
    times = quiz_mod.warm(list(bank.values()))
    assert set(times) == set(bank) and all(t >= 0 for t in times.values())
    calls = []
    real = quiz_mod.route_text
    monkeypatch.setattr(quiz_mod, "route_text", lambda *a, **k: calls.append(1) or real(*a, **k))
    quiz = QuizState(list(bank.values()))
    for i in range(len(quiz.questions)):
        quiz.go(i)
        quiz.prompt()
    assert calls == []


def test_quiz_logic_imports_no_panel_or_bokeh():
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path("app/quiz.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"panel", "bokeh"}
