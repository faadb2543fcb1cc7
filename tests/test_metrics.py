"""Balance measures: hand cases at both ends (perfect balance, collapse) and properties on any routing."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_core.analysis.metrics import METRICS, balance_metrics, coverage_curve
from moe_core.model.routing import route


def top1(experts: list[int], n: int):
    """A top-1 routing that sends token t to experts[t] (large logit there)."""
    logits = torch.full((len(experts), n), -10.0)
    logits[torch.arange(len(experts)), torch.tensor(experts)] = 10.0
    return route(logits, "softmax_topk", k=1)


def test_perfect_balance_and_collapse_at_the_two_ends():
    even = balance_metrics(top1([0, 1, 2, 3] * 5, 4))
    assert even["jain"] == 1.0 and math.isclose(even["entropy_norm"], 1.0)
    collapsed = balance_metrics(top1([2] * 20, 4))
    assert math.isclose(collapsed["jain"], 1 / 4) and collapsed["entropy_norm"] == 0.0
    # 3 tokens on expert 0, 1 on expert 1 (of 2): Jain = 16 / (2 * 10), entropy = H(3/4, 1/4) / ln 2
    mixed = balance_metrics(top1([0, 0, 0, 1], 2))
    assert math.isclose(mixed["jain"], 0.8)
    assert math.isclose(mixed["entropy_norm"], -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2))
    assert {"jain", "entropy_norm"} <= set(METRICS)       # each has its definition for the hover


def test_coverage_curve_counts_layer_expert_pairs_as_tokens_accumulate():
    a = top1([0, 0, 1, 2, 1], 4)          # layer 0: experts 0, 1, 2 first used at tokens 0, 2, 3
    b = top1([3, 3, 3, 3, 0], 4)          # layer 1: experts 3, 0 first used at tokens 0, 4
    assert coverage_curve([a, b]) == [2, 2, 3, 4, 5]
    assert coverage_curve([]) == []


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), min_size=1,
                                                                            max_size=40))))
def test_measures_stay_in_their_ranges_on_any_routing(case):
    n, experts = case
    r = top1(experts, n)
    m = balance_metrics(r)
    assert 1 / n - 1e-9 <= m["jain"] <= 1 + 1e-9
    assert -1e-9 <= m["entropy_norm"] <= 1 + 1e-9
    curve = coverage_curve([r, r])
    assert curve == sorted(curve) and curve[-1] == 2 * len(set(experts)) and curve[0] == 2
