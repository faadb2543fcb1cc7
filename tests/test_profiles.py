"""Expert profiles, the disabled_experts ablation switch and the profiles view (plain Python, no browser)."""
import hashlib
import json
from collections import Counter

import numpy as np
import pytest
import torch

from moe_core.analysis import profiles as P
from moe_core.data.categories import CATEGORIES
from moe_core.inference import route_ids, route_text
from moe_core.model.checkpoint import list_checkpoints, load
from moe_core.model.layer import MoELayer, expert_loop
from moe_core.model.request import RoutingRequest
from moe_core.model.routing import SCHEMES

SMALL = 1024  # held-out tokens for the quick checks (4 windows of 256)
TEXT = "def add(a, b):\n    return a + b  # 42\nThe year 1984 had 365 days, said Juliet."


# ----------------------------------------------------------------------------- categories


def test_every_vocabulary_entry_has_a_category():
    cats, texts = P._vocab_tables()
    assert len(cats) == len(texts) == 4096
    assert set(np.unique(cats)) <= set(range(len(CATEGORIES)))


# ----------------------------------------------------------------------------- disabled_experts in the layer


def _layer(scheme="softmax_topk", n=4):
    torch.manual_seed(0)
    return MoELayer(16, 8, n, top_k=2, scheme=scheme)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_disabled_expert_receives_nothing_under_every_scheme(scheme):
    layer = _layer(scheme)
    x = torch.randn(40, 16)
    ids = torch.arange(40)                                # token ids: what hash routing routes by
    r = layer.route(x, token_ids=ids, disabled_experts=[1])
    assert not r.dispatch[:, 1].any() and not r.dropped[:, 1].any()
    assert (r.combine[:, 1] == 0).all() and (r.probs[:, 1] == 0).all()
    assert not (r.choices == 1).any() and not (r.indices == 1).any()
    assert r.combine.shape == (40, 4) and r.load[1] == 0
    assert torch.equal(r.logits, layer.router(x))        # raw logits kept for display
    y, r2 = layer(x, ids, disabled_experts=[1])
    ref = expert_loop(layer.experts, x, r2.indices, r2.weights)        # no shared experts here
    assert torch.allclose(y, ref, atol=1e-5)


def test_softmax_ablation_equals_minus_infinity_logits_and_renormalises():
    layer = _layer()
    x = torch.randn(30, 16)
    r = layer.route(x, disabled_experts=[2])
    logits = layer.router(x).masked_fill(torch.arange(4) == 2, float("-inf"))
    assert torch.allclose(r.probs, logits.softmax(-1), atol=1e-6)
    assert torch.allclose(r.combine.sum(-1), torch.ones(30), atol=1e-6)   # top-k weights renormalised


def test_deepseek_bias_cannot_bring_a_disabled_expert_back():
    layer = _layer("deepseek")
    layer.expert_bias[3] = 100.0
    x = torch.randn(20, 16)
    assert (layer.route(x).choices == 3).any(-1).all()      # without the switch, every token picks it
    r = layer.route(x, disabled_experts=[3])
    assert not (r.choices == 3).any() and (r.probs[:, 3] == 0).all()


def test_balanced_schemes_share_all_tokens_among_the_remaining_experts():
    x = torch.randn(30, 16)
    base = _layer("base").route(x, disabled_experts=[0])
    assert base.load.tolist()[0] == 0 and sorted(base.load.tolist()[1:]) == [10, 10, 10]
    ec = _layer("expert_choice").route(x, disabled_experts=[0])
    assert ec.load[0] == 0 and set(ec.load.tolist()[1:]) == {10}          # capacity ceil(1.0 * 30 / 3)


def test_no_disabled_experts_changes_nothing():
    layer = _layer()
    x = torch.randn(12, 16)
    a, b = layer.route(x), layer.route(x, disabled_experts=[])
    assert torch.equal(a.combine, b.combine) and torch.equal(a.choices, b.choices)


@pytest.mark.parametrize("scheme, off, msg", [
    ("softmax_topk", [4], "does not exist"), ("softmax_topk", [-1], "does not exist"),
    ("softmax_topk", [True], "does not exist"), ("softmax_topk", ["1"], "does not exist"),
    ("softmax_topk", [0, 1, 2], "needs at least 2"), ("switch", [0, 1, 2, 3], "needs at least 1"),
    ("gshard", [0, 1, 2], "needs at least 2"), ("softmax_topk", 3, "list of expert numbers"),
])
def test_disabled_experts_validation(scheme, off, msg):
    with pytest.raises(ValueError, match=msg):
        _layer(scheme).route(torch.randn(8, 16), disabled_experts=off)


def test_model_level_validation_and_route_text():
    m = load("moe-n8")
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        route_text(m, TEXT, disabled_experts={9: [0]})
    with pytest.raises(ValueError, match="dict"):
        RoutingRequest.make(m.config, disabled_experts=[0])
    with pytest.raises(ValueError, match="expert 8 does not exist"):
        route_text(m, TEXT, disabled_experts={1: [8]})
    on = route_text(m, TEXT)
    off = route_text(m, TEXT, disabled_experts={1: [3, 5]})
    assert off.routings[1].load[[3, 5]].tolist() == [0, 0]
    assert torch.equal(on.routings[0].choices, off.routings[0].choices)   # earlier layers untouched
    assert off.loss != on.loss


def test_ablation_never_touches_the_shared_weights():
    m = load("moe-n8")

    def digest():
        h = hashlib.sha256()
        for v in m.model.state_dict().values():
            h.update(v.numpy().tobytes())
        return h.hexdigest()

    before = digest()
    P.ablate(m, 2, 1, text=TEXT)
    route_text(m, TEXT, disabled_experts={0: [0, 1]})
    assert digest() == before


# ----------------------------------------------------------------------------- profiles


@pytest.fixture(scope="module")
def n4_profile():
    return P.expert_profiles(load("moe-n4"), n_tokens=SMALL)


def test_profile_counts_add_up(n4_profile):
    p = n4_profile
    T, k = p["slice"]["n_tokens"], p["route"]["top_k"]
    assert T == SMALL and p["slice"]["windows"] == 4 and p["model"] == "moe-n4" and p["source"] == "computed now"
    assert abs(sum(p["corpus_categories"]) - 1) < 1e-3
    for L in p["layers"]:
        ex = L["experts"]
        assert len(ex) == 4
        assert sum(e["first_choice"] for e in ex) == T
        assert sum(e["all_choices"] for e in ex) == T * k
        assert sum(e["processed"] for e in ex) == T * k            # softmax top-k is dropless
        assert abs(sum(e["share_first"] for e in ex) - 1) < 1e-3
        assert abs(sum(e["share_all"] for e in ex) - 1) < 1e-3
        for e in ex:
            if e["first_choice"]:
                assert abs(sum(e["categories"]) - 1) < 1e-3
            assert len(e["top_tokens"]) <= P.TOP_TOKENS and e["summary"]


def test_top_tokens_really_go_to_that_expert(n4_profile):
    m = load("moe-n4")
    x, _ = P.heldout_windows(SMALL, m.config.block_size)
    ids = x.reshape(-1).tolist()
    routings, _ = route_ids(m.model, ids)                       # the path route_text uses
    totals = Counter(ids)
    for li, L in enumerate(n4_profile["layers"]):
        top1 = routings[li].top1.tolist()
        for e in L["experts"]:
            mine = Counter(t for t, f in zip(ids, top1) if f == e["expert"])
            for tid, text, count, share in e["top_tokens"] + e["distinctive_tokens"]:
                assert mine[tid] == count and abs(share - count / totals[tid]) < 1e-4
                assert text == P._vocab_tables()[1][tid]
            if e["top_tokens"]:
                assert e["top_tokens"][0][2] == max(mine.values())


def test_summary_is_honest():
    base = np.zeros(len(CATEGORIES))
    base[0], base[10] = 0.06, 0.94
    shares = np.zeros(len(CATEGORIES))
    shares[0], shares[10] = 0.71, 0.29
    assert P._summary(shares, base, 500) == "digit 71% (corpus 6%)"
    assert P._summary(base, base, 500).startswith("no category stands out")
    assert "too few" in P._summary(shares, base, 3)
    assert P._summary(shares, base, 0) == "never a first choice on the held-out slice"


def test_cache_round_trip_and_mismatch(tmp_path, n4_profile):
    m = load("moe-n4")
    path = P.save_profiles(n4_profile, tmp_path)
    assert path.name == "moe-n4.json"
    cached = P.load_profiles(m, n_tokens=SMALL, directory=tmp_path)
    assert cached["source"] == "cache" and cached["layers"] == n4_profile["layers"]
    for field, value in (("model_fingerprint", "0" * 16), ("steps", 1), ("categories", ["digit"])):
        doc = json.loads(path.read_text())
        doc[field] = value
        path.write_text(json.dumps(doc))
        again = P.load_profiles(m, n_tokens=SMALL, directory=tmp_path)
        assert again["source"] == "computed now" and again["model_fingerprint"] == n4_profile["model_fingerprint"]
    path.write_text("{not json")
    assert P.load_profiles(m, n_tokens=SMALL, directory=tmp_path)["source"] == "computed now"


@pytest.mark.parametrize("name", [d["name"] for d in list_checkpoints()])
def test_shipped_profile_caches_match_their_checkpoints(name):
    path = P.PROFILE_DIR / f"{name}.json"
    assert path.is_file(), "run: python -m moe_core.analysis.profiles --all"
    assert path.stat().st_size < 200 * 1024
    assert P.load_profiles(load(name))["source"] == "cache", "stale cache: run python -m moe_core.analysis.profiles --all"


def test_cli_errors(capsys):
    assert P.main(["no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert P.main([]) == 2


# ----------------------------------------------------------------------------- ablation


def test_ablation_on_held_out_tokens():
    m = load("moe-n8")
    a = P.ablate(m, 1, 5, n_tokens=SMALL)
    assert a["source"] == "held-out" and a["n_tokens"] == SMALL
    assert a["first_choice_tokens"] > 0
    assert sum(a["goes_to"]) + a["unrouted"] == a["first_choice_tokens"]
    assert a["goes_to"][5] == 0 and a["load_off"][5] == 0 and a["load_on"][5] > 0
    assert a["loss_off"] != a["loss_on"] and a["delta"] == pytest.approx(a["loss_off"] - a["loss_on"], abs=2e-4)
    assert len(a["top1_changed_later"]) == 2


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_ablation_under_every_scheme(scheme):
    m = load("moe-n8")
    torch.manual_seed(0)                                  # random routing: the same draw as route_text's below
    a = P.ablate(m, 2, 0, text=TEXT, scheme=scheme)
    assert a["load_off"][0] == 0 and a["goes_to"][0] == 0
    assert sum(a["goes_to"]) + a["unrouted"] == a["first_choice_tokens"]
    # the loss with the expert on is the loss route_text reports for the same routing
    torch.manual_seed(0)
    assert a["loss_on"] == pytest.approx(route_text(m, TEXT, scheme=scheme).loss, abs=1e-3)


def test_ablation_validation():
    m = load("moe-n8")
    for kw, msg in (({"layer": 4, "expert": 0}, "layer 4 does not exist"),
                    ({"layer": 0, "expert": 8}, "expert 8 does not exist"),
                    ({"layer": 0, "expert": True}, "does not exist")):
        with pytest.raises(ValueError, match=msg):
            P.ablate(m, **kw, text=TEXT)
    with pytest.raises(ValueError, match="empty"):
        P.ablate(m, 0, 0, text="")
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        P.ablate(m, 0, 0, text="a")
    with pytest.raises(ValueError, match="limited to"):
        P.ablate(m, 0, 0, n_tokens=10**6)
    with pytest.raises(ValueError, match="top-k"):
        P.ablate(m, 0, 0, text=TEXT, top_k=9)


# ----------------------------------------------------------------------------- the view


def test_view_builds_and_reacts_to_state():
    from app.state import RouterState
    from app.views.profiles import ExpertProfiles

    s = RouterState(text=TEXT)
    v = ExpertProfiles(state=s)
    v.__panel__()
    assert v.profiles["model"] == "moe-n8" and v.profiles["source"] == "cache"
    assert "Expert 0, layer 0" in v.summary.object
    s.layer = 2
    assert v.layer.value == 2
    v.expert.value = 3
    e = v.profiles["layers"][2]["experts"][3]
    assert "Expert 3, layer 2" in v.summary.object
    assert v.bars.data["expert"] == [e["categories"][CATEGORIES.index(c)] for c in v.bars.data["cat"]]
    assert v.bars.data["corpus"][-1] == v.profiles["corpus_categories"][0]     # reversed: digit at the top
    chart = v.chart
    v.switch.value = True                                   # runs at once outside a server
    assert v.ablation is not None and "switched off" in v.result.object
    assert v.ablation["held"]["expert"] == 3 and v.ablation["text"]["n_tokens"] > 0
    s.text = "something else"                               # the result would be stale: switched off
    assert v.switch.value is False and v.result.object == ""
    s.n_experts = 4
    assert v.profiles["model"] == "moe-n4" and len(v.expert.options) == 4
    assert v.chart is chart                                 # data updated in place, no new Bokeh models


def test_view_escapes_tokens():
    from app.views.profiles import token_table, visible

    assert visible(" <b>\n\t") == "\u2423&lt;b&gt;\u21b5\u21e5"
    out = token_table([[1, "<script>alert(1)</script>", 3, 0.5]], "t", "w")
    assert "<script>" not in out and "&lt;script&gt;" in out
