"""Values the browser sends are untrusted: each crafted one is refused with a message, never a traceback.

The messages below are what a websocket client can send for the first screen's controls (the probe of
issue #23 logged a server traceback for 21 of 28 such values, and N active = -1 picked the last model).
"""
from __future__ import annotations

import logging

import pytest

from app.dashboard import Dashboard

CRAFTED = [
    ("top_k", {"value_throttled": 999}), ("top_k", {"value_throttled": "abc"}), ("top_k", {"value_throttled": 0}),
    ("capacity", {"value_throttled": -1}), ("capacity", {"value_throttled": "abc"}),
    ("capacity", {"value_throttled": float("nan")}),
    ("scheme", {"value": "bogus"}), ("scheme", {"value": 3}),
    ("balancing", {"value": "imaginary"}),
    ("n_experts", {"active": -1}), ("n_experts", {"active": 99}), ("n_experts", {"active": "1"}),
    ("text", {"value": 12345}), ("text", {"value_input": 12345}),
    ("preset", {"value": "no such example"}),
    ("lesson_pick", {"value": "no such lesson"}),
    ("presenter", {"value": "yes"}),
    ("tabs", {"value": "admin"}),
    ("screen", {"layer": "abc"}), ("screen", {"selected": -5}),
]


@pytest.fixture(scope="module")
def dashboard():
    d = Dashboard()
    d.page_layout()
    return d


@pytest.mark.parametrize("name, message", CRAFTED, ids=[f"{n}-{list(m.values())[0]!r}" for n, m in CRAFTED])
def test_a_crafted_value_is_refused_with_a_message_and_changes_nothing(dashboard, name, message, caplog):
    s = dashboard.state
    before = (s.n_experts, s.balancing, s.scheme, s.top_k, s.capacity_factor, s.text, s.layer,
              s.selected_token, dashboard.tabs.value, s.result)
    seq = dashboard.toast.seq
    with caplog.at_level(logging.ERROR):
        getattr(dashboard, name)._process_events(message)          # what Panel calls for a browser message
    assert dashboard.toast.seq == seq + 1 and "not applied" in dashboard.toast.message
    assert (s.n_experts, s.balancing, s.scheme, s.top_k, s.capacity_factor, s.text, s.layer,
            s.selected_token, dashboard.tabs.value, s.result) == before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_good_value_still_applies_and_the_next_change_routes(dashboard):
    s = dashboard.state
    dashboard.top_k._process_events({"value_throttled": 999})         # refused
    result = s.result
    dashboard.top_k._process_events({"value_throttled": 3})           # then a real one
    assert s.top_k == 3 and s.result is not result and s.result.top_k == 3
    dashboard.n_experts._process_events({"active": 0})
    assert s.n_experts == s.param.n_experts.objects[0]


@pytest.mark.parametrize("name, message", [("n", {"value": 999}), ("k", {"value": "abc"}), ("steps", {"value": -5}),
                                           ("seed", {"value": "x"}), ("scheme", {"value": "bogus"}),
                                           ("layer", {"active": -1}), ("aux", {"value": float("inf")})])
def test_the_training_labs_controls_refuse_crafted_values_too(dashboard, name, message, caplog):
    dashboard.show_tab("lab")
    w = getattr(dashboard._lab, name)
    before, seq = w.value, dashboard.toast.seq
    with caplog.at_level(logging.ERROR):
        w._process_events(message)
    assert w.value == before and dashboard.toast.seq == seq + 1 and "not applied" in dashboard.toast.message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
