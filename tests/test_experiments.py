"""The guided experiments (moe_core/experiments.py) and the trivial routers they compare against.

The measures are checked on hand-made routings whose answer is known; each experiment is then run on
the shipped models and its finding is checked against its own numbers (never typed in), and against
what the routing scheme guarantees (hash routing sends a token id to one expert set, always).
The trivial routers themselves are tested in tests/test_trivial_routers.py.
"""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from moe_core.cli import main
from moe_core.experiments import (
    EXPERIMENTS,
    OWN_MODELS,
    coactivation,
    merged,
    prune,
    random_choices,
    reap_saliency,
    run_experiment,
    saturation_curve,
    saturation_result,
    shares,
    specialisation,
)
from moe_core.analysis.metrics import topk_overlap
from moe_core.model.checkpoint import load


# -- the measures, on routings with a known answer ----------------------------------------------------------


def test_specialisation_is_one_for_a_fixed_map_and_near_k_over_n_for_random_choices():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, 20_000)
    fixed = np.stack([ids % 8, (ids + 3) % 8], 1)                 # every id always to the same 2 experts
    assert specialisation(ids, fixed, 8) == 1.0
    rand = np.stack([rng.permutation(8)[:2] for _ in ids])
    assert 0.25 <= specialisation(ids, rand, 8) < 0.30              # k/N = 2/8, a little more (the luckiest)
    assert np.isnan(specialisation(np.array([1, 2]), np.array([[0, 1], [1, 0]]), 8))   # no id seen 8 times


def test_random_choices_are_what_random_routing_decides():
    (ch,) = random_choices(40_000, 8, 2, 1)
    assert ch.shape == (40_000, 2) and (ch[:, 0] != ch[:, 1]).all()
    assert abs(shares(ch, 8) - 1 / 8).max() < 0.01
    pairs = np.bincount(np.sort(ch, 1) @ np.array([8, 1]), minlength=64).reshape(8, 8)
    assert pairs[np.triu_indices(8, 1)].min() > 0.85 * 40_000 / 28        # every pair as likely
    assert np.array_equal(random_choices(5, 8, 2, 1)[0], random_choices(5, 8, 2, 1)[0])   # seeded


def test_coactivation_counts_which_experts_share_a_token():
    choices = np.array([[0, 1], [0, 1], [0, 2], [3, -1]])
    c = coactivation(choices, 4)
    assert c[0, 1] == pytest.approx(2 / 3) and c[0, 2] == pytest.approx(1 / 3) and c[1, 0] == 1.0
    assert c[3].sum() == 0 and np.all(np.diag(c) == 0)


def test_shares_count_every_choice_and_sum_to_one():
    s = shares(np.array([[0, 1], [0, -1], [2, 0]]), 4)
    assert s.tolist() == [0.6, 0.2, 0.2, 0.0]


def test_topk_overlap_ignores_order_and_padding():
    a = np.array([[0, 1], [2, 3], [4, -1]])
    assert topk_overlap(a, a) == 1.0
    assert topk_overlap(np.array([[1, 0], [3, 2], [4, -1]]), a) == 1.0
    assert topk_overlap(np.array([[0, 5], [6, 7], [4, -1]]), a) == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="same tokens"):
        topk_overlap(a[:2], a)


def test_saturation_curve_ends_at_one_and_measures_each_probe_against_the_last():
    last = [np.array([[0, 1], [2, 3]])]
    first = [np.array([[0, 5], [6, 7]])]
    assert saturation_curve([first, last]) == [[0.25], [1.0]]


def test_saturation_result_says_from_which_step_each_layer_keeps_its_final_choices():
    final, other = np.array([[0, 1]] * 4), np.array([[2, 3]] * 4)
    res = saturation_result([10, 20, 30, 40], [[other, final], [final, other], [final, final], [final, final]], 2)
    assert res["numbers"]["overlap_with_final"] == [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert res["numbers"]["settled_from"] == [20, 30]          # layer 1 lost its choices at step 20
    assert res["answer"] == 1 and "layer 0 from step 20, layer 1 from step 30" in res["finding"]
    early = saturation_result([10, 20, 30, 40], [[final, final]] * 4, 2)
    assert early["answer"] == 0 and early["numbers"]["settled_from"] == [10, 10]
    with pytest.raises(ValueError, match="probed at least twice"):
        saturation_result([10], [[final]], 2)


# -- each experiment on the real models --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def n8():
    return load("moe-n8")


def check_shape(res: dict, name: str) -> None:
    e = EXPERIMENTS[name]
    assert res["name"] == name and res["choices"] == list(e.choices)
    assert 0 <= res["answer"] < len(e.choices)
    assert res["finding"] and res["figure"]["kind"] in ("bars", "heatmap", "table", "lines")
    json.dumps(res)                                   # plain data: the CLI prints it, the page draws it


def test_same_token_on_a_learned_model_and_on_the_hash_model(n8):
    res = run_experiment("same_token", n8)
    check_shape(res, "same_token")
    num = res["numbers"]
    assert num["token"] == " the" and num["occurrences"] >= 20
    assert all(0 < a <= 1 for a in num["first_expert_agreement"])
    least = min(num["first_expert_agreement"])
    assert res["answer"] == (0 if least == 1 else 1 if least >= 0.5 else 2)
    assert f"occurs {num['occurrences']} times" in res["finding"]
    rows = res["figure"]["rows"]
    assert len(rows) == 8 and all(r["token"] == " the" and len(r["experts"]) == 4 for r in rows)
    hashed = run_experiment("same_token", load("moe-n8-hash"))
    assert hashed["answer"] == 0 and hashed["numbers"]["first_expert_agreement"] == [1.0] * 4
    assert hashed["numbers"]["distinct_expert_sets"] == [1] * 4


@pytest.mark.parametrize("token, message", [("hello world", "not one"), ("\u0fff\u0ffe", "not one"),
                                            ("", "type a token"), ("the", "fewer than 8")])
def test_same_token_refuses_a_text_that_is_not_one_common_token(n8, token, message):
    with pytest.raises(ValueError, match=message):
        run_experiment("same_token", n8, token=token)


def test_domains_compares_each_domain_with_an_even_share(n8):
    res = run_experiment("domains", n8)
    check_shape(res, "domains")
    num = res["numbers"]
    assert num["domains"][:3] == ["English prose", "code", "numbers"]
    for d in num["domains"]:
        for layer in num["share"][d]:
            assert sum(layer) == pytest.approx(1.0)
    ce = num["code_expert"]
    assert ce["code_share"] == pytest.approx(num["share"]["code"][ce["layer"]][ce["expert"]])
    assert f"{round(100 * ce['code_share'])}% of code's routings" in res["finding"]
    assert res["answer"] == (0 if ce["code_share"] >= 2 / 8 and ce["code_share"] >= 2 * ce["best_other_share"] else 1)


def test_token_ids_beats_random_routing_on_a_learned_model(n8):
    res = run_experiment("token_ids", n8)
    check_shape(res, "token_ids")
    num = res["numbers"]
    assert num["k_over_n"] == 0.25
    assert all(0.25 <= c < 0.5 for c in num["random_routing"])
    assert all(s > c for s, c in zip(num["specialisation"], num["random_routing"]))


def test_coactivation_needs_two_experts_per_token(n8):
    res = run_experiment("coactivation", n8)
    check_shape(res, "coactivation")
    st = res["numbers"]["strongest"]
    assert res["numbers"]["coactivation"][st["layer"]][st["from"]][st["to"]] == st["share"]
    with pytest.raises(ValueError, match="at least 2 experts per token"):
        run_experiment("coactivation", load("moe-n8-switch"))


def test_learned_vs_hash_reports_whichever_wins():
    res = run_experiment("learned_vs_hash")
    check_shape(res, "learned_vs_hash")
    rows = res["numbers"]
    learned = min(rows["learned (moe-n8)"]["loss"], rows["learned, no balancing loss (moe-n8-nobalance)"]["loss"])
    hashed = rows["hash (moe-n8-hash)"]["loss"]
    assert res["answer"] == (0 if learned < hashed else 1)
    assert ("hash routing wins" in res["finding"]) == (hashed < learned)
    # the learned model routed by a hash it was not trained with is worse than with its own router
    assert rows["moe-n8 routed by the hash, untrained for it"]["loss"] > rows["learned (moe-n8)"]["loss"]


def test_prune_measures_every_choice_against_the_full_model(n8):
    res = run_experiment("prune", n8)
    check_shape(res, "prune")
    num = res["numbers"]
    assert num["experts"] == 8 and num["keep"] == 6
    for removed in num["removed"].values():
        assert all(len(v) == 2 for v in removed.values()) and len(removed) == 4
    for k, v in num["change"].items():
        assert v == pytest.approx(num["loss"][k] - num["base_loss"]) and v > 0     # fewer experts: worse
    best = min(num["change"], key=num["change"].get)
    assert f"Least harm: {best}." in res["finding"]


def test_reap_saliency_is_zero_for_an_expert_no_token_reaches(n8):
    sal, counts, loss = reap_saliency(n8)
    assert sal.shape == counts.shape == (4, 8) and (sal > 0).all() and loss > 0
    assert counts.sum(1).tolist() == [2 * 16384] * 4                    # k choices of every held-out token


def test_merging_averages_the_weights_by_token_count(n8):
    counts = np.full((4, 8), 10.0)
    counts[0, 3] = 30.0
    net = merged(n8, {0: [3]}, counts)
    e0 = n8.model.moe_layers[0].experts.w_in.data
    changed = [e for e in range(8) if not torch.equal(net.moe_layers[0].experts.w_in.data[e], e0[e])]
    assert len(changed) == 1 and changed[0] != 3
    into = changed[0]
    assert torch.allclose(net.moe_layers[0].experts.w_in.data[into], 0.75 * e0[3] + 0.25 * e0[into])
    assert torch.equal(n8.model.moe_layers[0].experts.w_in.data, e0)    # the loaded model is untouched


def test_prune_refuses_to_remove_every_expert(n8):
    with pytest.raises(ValueError, match="must leave between 1 and 7"):
        prune(n8, remove=8)


@pytest.mark.slow
def test_saturation_runs_a_lab_run_and_ends_at_its_own_routing():
    res = run_experiment("saturation", steps=40)
    check_shape(res, "saturation")
    num = res["numbers"]
    assert num["steps"] == [10, 20, 30, 40]
    assert [round(v, 6) for v in num["overlap_with_final"][-1]] == [1.0, 1.0]


def test_unknown_experiments_are_refused():
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment("magic")


# -- the command line -------------------------------------------------------------------------------------------


def test_cli_lists_the_experiments(capsys):
    assert main(["experiment", "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listed] == list(EXPERIMENTS)
    assert main(["experiment", "--list"]) == 0
    assert "coactivation" in capsys.readouterr().out


def test_cli_runs_one_as_json(capsys):
    assert main(["experiment", "token_ids", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["name"] == "token_ids" and res["model"] == "moe-n8" and len(res["numbers"]["specialisation"]) == 4


@pytest.mark.parametrize("argv, message", [
    (["experiment", "magic"], "unknown experiment 'magic'"),
    (["experiment", "learned_vs_hash", "--model", "moe-n4"], "uses its own models"),
    (["experiment", "domains", "--token", " the"], "--token applies to same_token only"),
    (["experiment", "same_token", "--token", "two words"], "is 3 tokens"),
    (["experiment", "domains", "--model", "nope"], "nope"),
])
def test_cli_refuses_bad_input_in_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


# -- one computation per server ------------------------------------------------------------------------------


def test_a_class_pressing_run_together_waits_for_one_computation():
    from app.views.experiments import shared_result

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.3)
        return {"n": len(calls)}

    key = ("test", time.time())
    out = []
    threads = [threading.Thread(target=lambda: out.append(shared_result(key, slow))) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and out == [{"n": 1}] * 10

    def fails():
        raise ValueError("bad token")

    for _ in range(2):                              # a failure is not kept: the next press tries again
        with pytest.raises(ValueError, match="bad token"):
            shared_result(("fail", key), fails)


def test_own_models_are_the_experiments_that_ignore_the_router_tabs_model():
    assert set(OWN_MODELS) <= set(EXPERIMENTS)
    assert EXPERIMENTS["saturation"].needs_training
