"""Generation ("watch it write"): the KV cache computes what the whole sequence computes, token by token
and expert by expert; greedy is deterministic, sampling follows its seed; bad requests are refused first."""
import itertools
import json

import pytest
import torch

from moe_core.cli import main
from moe_core.generate import generate
from moe_core.model.checkpoint import load
from moe_core.model.gpt import MoEConfig, MoEGPT
from moe_core.model.request import RoutingRequest

PROMPTS = ["Once upon a time", "def add(a, b):\n    return", "1 2 3 4", "La ville de"]


def tiny(scheme="softmax_topk", seed=0, **kw) -> MoEGPT:
    torch.manual_seed(seed)
    cfg = MoEConfig(block_size=32, n_layer=2, n_head=2, d_model=32, d_ff=32, n_experts=4, top_k=2, scheme=scheme, **kw)
    return MoEGPT(cfg).eval()


def written(model, prompt, n=8, **kw):
    return [t for t in generate(model, prompt, max_new_tokens=n, **kw) if t.phase == "decode"]


def assert_same_routing(a, b):
    assert a.experts == b.experts, (a.position, a.experts, b.experts)
    for wa, wb in zip(a.weights, b.weights):
        assert wa == pytest.approx(wb, abs=1e-5)


@torch.no_grad()
def test_the_cache_in_chunks_computes_what_one_pass_computes():
    """Prompt, then single tokens, then several at once (the masked path): same logits and routing."""
    net = tiny()
    idx = torch.randint(0, 4096, (2, 20))
    full = net(idx)
    cache, logits, routed = net.kv_cache(), [], []
    for a, b in ((0, 6), (6, 7), (7, 8), (8, 13), (13, 20)):
        out = net(idx[:, a:b], cache=cache)
        logits.append(out.logits)
        routed.append(out.routings[1].indices.view(2, b - a, -1))
    assert torch.allclose(torch.cat(logits, 1), full.logits, atol=1e-5)
    assert torch.equal(torch.cat(routed, 1), full.routings[1].indices.view(2, 20, -1))
    assert len(cache) == 2 and cache[0][0].shape == (2, 2, 20, 16)      # (B, nh, T, hs) per layer


def test_the_cache_is_checked():
    net = tiny()
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="kv_cache"):
        net(idx, cache=[[]])
    with pytest.raises(ValueError, match="mask"):
        net(idx, cache=net.kv_cache(), mask=torch.ones(1, 4, dtype=torch.bool))
    cache = net.kv_cache()
    net(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="longer than the context of 32"):
        net(idx, cache=cache)
    with pytest.raises(ValueError, match="sequences"):
        net(torch.zeros(2, 1, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("name,request_kw", [
    ("moe-n8", {}), ("moe-n4", {"top_k": 1}), ("moe-n8-bias", {}),          # softmax top-k, k = 1, DeepSeek
    ("moe-n8-switch", {"scheme": "softmax_topk", "top_k": 1}),              # a Switch model routed per token
])
def test_cached_and_uncached_write_the_same_tokens_through_the_same_experts(name, request_kw):
    m = load(name)
    request = RoutingRequest.make(m.config, **request_kw)
    for prompt in PROMPTS[:3]:
        fast = written(m, prompt, request=request)
        slow = written(m, prompt, request=request, use_cache=False)
        assert [t.id for t in fast] == [t.id for t in slow]
        for a, b in zip(fast, slow):       # the uncached step's routing is the one of its last position
            assert a.position == b.position
            assert_same_routing(a, b)


@pytest.mark.parametrize("scheme", ["softmax_topk", "noisy_topk", "deepseek"])
def test_every_token_carries_the_routing_the_whole_sequence_gives_it(scheme):
    """Prefill and decode tokens alike: their experts and weights are those of one pass over the final sequence."""
    net = tiny(scheme, seed=1)
    for prompt in ([5, 17, 300], [42]):
        toks = list(generate(net, prompt, max_new_tokens=10))
        assert [t.phase for t in toks] == ["prefill"] * len(prompt) + ["decode"] * 10
        assert [t.position for t in toks] == list(range(len(toks)))
        assert [t.id for t in toks][: len(prompt)] == prompt
        with torch.no_grad():
            out = net(torch.tensor([[t.id for t in toks]]))
        for t in toks:
            for layer, r in enumerate(out.routings):
                assert t.experts[layer] == r.indices[t.position].tolist()
                assert t.weights[layer] == pytest.approx(r.weights[t.position].tolist(), abs=1e-5)
        # greedy: each new token is the argmax of the position before it
        assert [t.id for t in toks[len(prompt):]] == out.logits[0, len(prompt) - 1:-1].argmax(-1).tolist()


def test_greedy_is_deterministic_and_sampling_follows_its_seed():
    m = load("moe-n8")

    def ids(**kw):
        return [t.id for t in written(m, "The king", n=12, **kw)]

    assert ids() == ids()
    assert ids(temperature=0.9, seed=7) == ids(temperature=0.9, seed=7)
    assert ids(temperature=0.9, seed=7) != ids(temperature=0.9, seed=8)
    assert ids(temperature=1e-300, seed=1) == ids()          # a vanishing temperature is greedy, no NaN
    assert len(ids(temperature=1e300, seed=3)) == 12         # a huge one is uniform, still valid ids
    assert ids(temperature=0.9, seed=2**64 - 1)


def test_the_generator_is_lazy_can_stop_and_leaves_no_mode_behind():
    net = tiny()
    stream = generate(net, [1, 2, 3], max_new_tokens=20)
    first = list(itertools.islice(stream, 5))
    assert [t.phase for t in first] == ["prefill"] * 3 + ["decode"] * 2
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()   # between steps: the caller's mode
    stream.close()


def test_the_context_is_filled_to_its_end_and_no_further():
    net = tiny()
    toks = list(generate(net, list(range(1, 30)), max_new_tokens=3))
    assert toks[-1].position == 31 and len(toks) == 32
    with pytest.raises(ValueError, match="from 1 to 3"):
        generate(net, list(range(1, 30)), max_new_tokens=4)
    with pytest.raises(ValueError, match="at most 31"):
        generate(net, list(range(32)), max_new_tokens=1)


@pytest.mark.parametrize("scheme", ["switch", "gshard", "expert_choice", "base"])
def test_schemes_that_route_a_group_are_refused(scheme):
    net = tiny()
    with pytest.raises(ValueError, match="routes each new token alone"):
        generate(net, [1], max_new_tokens=1, request=RoutingRequest.make(net.config, scheme))


def test_noisy_top_k_in_training_mode_is_refused():
    net = tiny("noisy_topk").train()
    with pytest.raises(ValueError, match="eval"):
        generate(net, [1], max_new_tokens=1)


@pytest.mark.parametrize("kw", [
    {"max_new_tokens": 0}, {"max_new_tokens": True}, {"max_new_tokens": 2.0}, {"max_new_tokens": 40},
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": True},
    {"temperature": "1"}, {"seed": -1}, {"seed": 2**64}, {"seed": 1.5}, {"seed": True},
    {"prompt": ""}, {"prompt": []}, {"prompt": [4096]}, {"prompt": [-1]}, {"prompt": [True]}, {"prompt": 7},
    {"prompt": "1 2 " * 20}, {"request": "softmax_topk"},
])
def test_bad_arguments_are_refused_before_any_work(kw):
    args = {"prompt": [1, 2], "max_new_tokens": 2, **kw}
    with pytest.raises(ValueError):
        generate(tiny(), args.pop("prompt"), **args)


def test_a_model_that_is_not_a_model_is_refused():
    with pytest.raises(ValueError, match="MoEGPT"):
        generate(object(), "hi", max_new_tokens=1)


def _without_timing(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("prefill_ms", "tokens_per_s")}


def test_cli_json_is_deterministic_and_holds_every_token_with_its_experts(capsys):
    runs = []
    for _ in range(2):
        assert main(["generate", "Once upon a time", "--max-new-tokens", "6", "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    a, b = runs
    assert _without_timing(a) == _without_timing(b)
    assert a["tokens_per_s"] > 0 and a["prefill_ms"] > 0
    assert a["scheme"] == "softmax_topk" and a["top_k"] == 2 and a["temperature"] == 0 and a["context"] == 256
    assert "".join(t["text"] for t in a["prefill"]) == "Once upon a time"
    assert len(a["tokens"]) == 6 and a["text"] == "".join(t["text"] for t in a["tokens"])
    assert [t["position"] for t in a["prefill"] + a["tokens"]] == list(range(len(a["prefill"]) + 6))
    for t in a["prefill"] + a["tokens"]:
        assert len(t["experts"]) == len(t["weights"]) == a["model"]["n_layer"]
        assert all(len(es) == 2 and sum(ws) == pytest.approx(1, abs=1e-5) for es, ws in zip(t["experts"], t["weights"]))


def test_cli_sampling_reports_its_seed_and_repeats_with_it(capsys):
    assert main(["generate", "The", "--max-new-tokens", "5", "--temperature", "1.2", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert isinstance(a["seed"], int)
    assert main(["generate", "The", "--max-new-tokens", "5", "--temperature", "1.2", "--seed", str(a["seed"]),
                 "--json"]) == 0
    assert _without_timing(json.loads(capsys.readouterr().out)) == _without_timing(a)


def test_cli_text_mode_writes_on_says_it_is_babble_and_sums_up_the_experts(capsys):
    threads = torch.get_num_threads()
    assert main(["generate", "Hello", "--model", "moe-n8-switch", "--scheme", "softmax_topk", "--top-k", "1",
                 "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "babble" in lines[0] and lines[1].startswith("Hello")
    assert "5 new tokens" in out and "tokens/s" in out and "layer 3: expert" in out
    assert torch.get_num_threads() == threads           # decoding ran on one thread; the count is put back
