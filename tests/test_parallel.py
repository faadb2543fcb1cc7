"""Expert parallelism (moe_core/parallel/expert_parallel.py): 2 real gloo processes on loopback must match one process.

The distributed checks run as one torchrun job (`--standalone --nproc-per-node 2`)
executing this file's `_distributed_checks`; rank 0 writes the measured
differences to a JSON file that the pytest functions assert on. One launch
serves every check, so the whole file takes ~30 s on 2 CPU cores.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_core.cli import main
from moe_core.parallel.expert_parallel import (
    ExchangeStats,
    check_expert_parallel,
    expert_placement,
)

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = [("softmax_topk", {}), ("noisy_topk", {}), ("switch", {"capacity_factor": 1.0}), ("gshard", {"capacity_factor": 1.0}),
           ("expert_choice", {}), ("deepseek", {})]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    return env


def _torchrun(args: list[str], **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env(**env), cwd=ROOT)


# ----------------------------------------------------------------------------- the distributed side (under torchrun)


def _distributed_checks(out_path: str) -> None:
    import torch.distributed as dist

    from moe_core.model.gpt import MoEConfig, MoEGPT
    from moe_core.model.layer import MoELayer
    from moe_core.parallel.expert_parallel import (
        ExpertParallelMoE,
        clip_grad_norm,
        init,
        shard_model,
        sync_gradients,
        unshard_model,
    )
    from moe_core.train.loop import TrainConfig, configure_optimizer

    init("cpu")
    torch.set_num_threads(1)
    r, p = dist.get_rank(), dist.get_world_size()
    results: dict = {"layers": {}}

    # 1. one MoE layer, uneven token counts per rank (7 tokens on rank 0, 5 on rank 1)
    sizes = [7, 5]
    start = sum(sizes[:r])
    mine = slice(start, start + sizes[r])
    for scheme, opts in SCHEMES:
        torch.manual_seed(0)
        single = MoELayer(16, 24, 8, top_k=2, scheme=scheme, n_shared=1, **opts)
        parallel = ExpertParallelMoE(copy.deepcopy(single))        # own router copy: gradients compared apart
        x = torch.randn(sum(sizes), 16)
        g = torch.randn(sum(sizes), 16)                              # d loss / d y, the same on every rank
        xs = x.clone().requires_grad_()
        torch.manual_seed(5)                                         # noisy top-k draws its noise here...
        ys, rs = single(xs)
        (ys * g).sum().backward()
        xp = x[mine].clone().requires_grad_()
        torch.manual_seed(5)                                         # ...and every rank draws the same
        yp, rp = parallel(xp)
        (yp * g[mine]).sum().backward()
        lo, hi = parallel.local_experts[0], parallel.local_experts[-1] + 1
        router_grad = parallel.router.weight.grad.clone()
        dist.all_reduce(router_grad)                                # each rank holds its tokens' part
        results["layers"][scheme] = {
            "y": (yp - ys[mine]).abs().max().item(),
            "same_routing": bool(torch.equal(rp.indices, rs.indices) and torch.equal(rp.dropped, rs.dropped)),
            "aux": abs(rp.aux["load_balance"].item() - rs.aux["load_balance"].item()),
            "grad_x": (xp.grad - xs.grad[mine]).abs().max().item(),
            "grad_w_in": (parallel.experts.w_in.grad - single.experts.w_in.grad[lo:hi]).abs().max().item(),
            "grad_w_out": (parallel.experts.w_out.grad - single.experts.w_out.grad[lo:hi]).abs().max().item(),
            "grad_router": (router_grad - single.router.weight.grad).abs().max().item(),
            "traffic": parallel.last_stats.traffic,
            "load_per_rank": parallel.last_stats.load_per_rank,
            "dropped_per_rank": parallel.last_stats.dropped_per_rank,
            "load": rs.load.tolist(),
            "dropped": rs.dropped.sum(0).tolist(),
        }

    # 2. a rank with no tokens at all still takes part in every exchange
    torch.manual_seed(0)
    single = MoELayer(16, 24, 8, top_k=2)
    parallel = ExpertParallelMoE(copy.deepcopy(single))
    x = torch.randn(6, 16)
    yp, _ = parallel(x if r == 0 else x[:0])
    results["empty_rank"] = (yp - single(x)[0]).abs().max().item() if r == 0 else None

    # 3. two training steps of a small model: one process on the whole batch vs 2 ranks on halves
    cfg = MoEConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=32, n_experts=4,
                    top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001)
    tcfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=1, grad_clip=0.05)  # small clip: it acts
    torch.manual_seed(1)
    ref = MoEGPT(cfg)
    sharded = shard_model(copy.deepcopy(ref))
    opt_ref, opt_par = configure_optimizer(ref, tcfg), configure_optimizer(sharded, tcfg)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(2):
        x = torch.randint(64, (4, 16), generator=gen)
        y = torch.randint(64, (4, 16), generator=gen)
        out = ref(x, y, return_logits=False)
        opt_ref.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), tcfg.grad_clip)
        opt_ref.step()
        rows = slice(2 * r, 2 * r + 2)
        out_p = sharded(x[rows], y[rows], return_logits=False)       # ExpertParallelTrainer's step, by hand
        opt_par.zero_grad()
        out_p.loss.backward()
        sync_gradients(sharded)
        clip_grad_norm(sharded, tcfg.grad_clip)
        opt_par.step()
        mean = out_p.loss.detach().clone()
        dist.all_reduce(mean)
        losses.append([out.loss.item(), mean.item() / p])
    full = unshard_model(sharded).state_dict()
    results["train_losses"] = losses
    results["train_param_diff"] = max((full[k] - v).abs().max().item() for k, v in ref.state_dict().items())
    results["train_changed"] = max((v - MoEGPT(cfg).state_dict()[k]).abs().max().item()
                                   for k, v in ref.state_dict().items())

    # 4. the training loop itself (train_parallel, evaluate_parallel, unshard) against train.train
    import numpy as np

    from moe_core.data.tokens import TokenData
    from moe_core.parallel.expert_parallel import train_parallel
    from moe_core.train.loop import train

    rng = np.random.RandomState(0)
    data = TokenData(rng.randint(0, 64, 4000), rng.randint(0, 64, 1000))
    tcfg = TrainConfig(steps=3, batch_size=4, warmup_steps=1, eval_interval=0, eval_batches=2)
    result_p, traffic = train_parallel(cfg, tcfg, data=data)
    history_p, eval_p = result_p.history, result_p.eval_loss
    full_p = unshard_model(result_p.model).state_dict()
    single = train(cfg, tcfg, data=data)
    results["loop_param_diff"] = max((full_p[k] - v).abs().max().item() for k, v in single.model.state_dict().items())
    results["loop_losses"] = [[a["loss"], b["loss"]] for a, b in zip(single.history, history_p)]
    results["loop_eval"] = [single.eval_loss, eval_p]
    results["loop_traffic_total"] = [sum(map(sum, layer)) for layer in traffic[-1]]
    if r == 0:
        Path(out_path).write_text(json.dumps(results), encoding="utf-8")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep") / "results.json"
    p = _torchrun([str(Path(__file__).resolve()), str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("scheme", [s for s, _ in SCHEMES])
@pytest.mark.slow     # processes started with torch.distributed
def test_layer_matches_single_process(distributed, scheme):
    d = distributed["layers"][scheme]
    assert d["same_routing"]
    assert d["y"] < 1e-5 and d["aux"] < 1e-6
    for key in ("grad_x", "grad_w_in", "grad_w_out", "grad_router"):
        assert d[key] < 1e-5, (key, d[key])


@pytest.mark.parametrize("scheme", [s for s, _ in SCHEMES])
@pytest.mark.slow     # processes started with torch.distributed
def test_traffic_adds_up_to_the_routing(distributed, scheme):
    d = distributed["layers"][scheme]
    # rank 0 holds experts 0-3, rank 1 experts 4-7: what a rank computed is its experts' load
    assert d["load_per_rank"] == [sum(d["load"][:4]), sum(d["load"][4:])]
    assert [sum(col) for col in zip(*d["traffic"])] == d["load_per_rank"]
    assert d["dropped_per_rank"] == [sum(d["dropped"][:4]), sum(d["dropped"][4:])]
    if scheme in ("switch", "gshard"):
        assert sum(d["dropped"]) > 0          # 12 tokens, capacity factor 1: the test really exercises drops


@pytest.mark.slow     # processes started with torch.distributed
def test_a_rank_without_tokens_still_matches(distributed):
    assert distributed["empty_rank"] < 1e-5


@pytest.mark.slow     # processes started with torch.distributed
def test_training_steps_match_single_process(distributed):
    assert distributed["train_changed"] > 1e-3           # the steps really moved the weights
    assert distributed["train_param_diff"] < 1e-5
    for single, parallel in distributed["train_losses"]:
        assert abs(single - parallel) < 1e-5


@pytest.mark.slow     # processes started with torch.distributed
def test_training_loop_matches_train_train(distributed):
    assert distributed["loop_param_diff"] < 1e-5
    assert len(distributed["loop_losses"]) == 3
    for single, parallel in distributed["loop_losses"]:
        assert abs(single - parallel) < 1e-5
    single, parallel = distributed["loop_eval"]
    assert abs(single - parallel) < 1e-5
    # every layer of the last step moved 4 x 16 tokens x top-2 = 128 (token, expert) pairs
    assert distributed["loop_traffic_total"] == [128, 128]


@pytest.mark.slow     # processes started with torch.distributed
def test_cli_route_json_matches_single_process():
    from moe_core.analysis.export import trace_dict
    from moe_core.inference import route_text
    from moe_core.model.checkpoint import load

    text = "def f(x):\n    return x * 42  # the answer"
    p = subprocess.run([sys.executable, "-m", "moe_core", "route", "--expert-parallel", "2", "--model",
                        "moe-n8-switch", "--json", text],
                       capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    model = load("moe-n8-switch")
    ep, sp = json.loads(p.stdout), json.loads(json.dumps(trace_dict(route_text(model, text), model)))
    par = ep.pop("expert_parallel")
    assert ep["tokens"] == sp["tokens"]
    for a, b in zip(ep["layers"], sp["layers"]):
        for key in ("experts", "dropped", "choices", "load", "capacity"):
            assert a[key] == b[key], key
        # weights: equal up to float32 noise (the processes run with 1 thread, pytest with several)
        assert [w for row in a["weights"] for w in row] == pytest.approx([w for row in b["weights"] for w in row],
                                                                         abs=2e-6)
        assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-5, abs=1e-6)
    assert ep["loss"] == pytest.approx(sp["loss"], rel=1e-5)
    assert par["world_size"] == 2 and par["backend"] == "gloo"
    assert par["placement"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for L, layer in zip(par["layers"], sp["layers"]):
        assert len(L["traffic"]) == 2 and all(len(row) == 2 for row in L["traffic"])
        assert L["load_per_rank"] == [sum(layer["load"][:4]), sum(layer["load"][4:])]
        assert sum(map(sum, L["traffic"])) == sum(layer["load"])
        assert sum(L["dropped_per_rank"]) == sum(len(d) for d in layer["dropped"])


@pytest.mark.parametrize("args, message", [
    (["route", "--expert-parallel", "3", "hello"], "must divide the number of experts N = 8"),
    (["route", "--expert-parallel", "0", "hello"], "expected a whole number from 1"),
    (["route", "--expert-parallel", "-2", "hello"], "expected a whole number from 1"),
    (["route", "--expert-parallel", "two", "hello"], "expected a whole number"),
    (["route", "--expert-parallel", "16", "--model", "moe-n8", "hello"], "must divide"),
    (["route", "--expert-parallel", "32", "--model", "moe-n32", "hello"], "at most 16 local processes"),
    (["route", "--expert-parallel", "2", "--top-k", "9", "hello"], "top-k must be between"),
    (["route", "--expert-parallel", "2", ""], "the text is empty"),
    (["train", "--preset", "tiny", "--expert-parallel", "3"], "must divide the number of experts N = 4"),
])
def test_bad_expert_parallel_gives_one_line_and_exit_2(capsys, args, message):
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err, err


def test_mismatch_with_torchrun_world_size(capsys, monkeypatch):
    for k, v in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    assert main(["route", "--expert-parallel", "2", "hello"]) == 2
    assert "does not match torchrun's 4 processes" in capsys.readouterr().err


def test_self_launch_passes_every_option_on():
    """The command line each torchrun process runs parses back to the same request."""
    from moe_core.cli import build_parser
    from moe_core.parallel.expert_parallel import route_argv, train_argv

    parser = build_parser()
    args = parser.parse_args(["route", "--expert-parallel", "2", "--scheme", "switch", "--capacity-factor", "1.5",
                              "--json", "--", "-x"])
    again = parser.parse_args(route_argv(args, "moe-n8", "cpu"))
    for key in ("expert_parallel", "scheme", "capacity_factor", "top_k", "json"):
        assert getattr(again, key) == getattr(args, key), key
    assert again.model == "moe-n8" and again.device == "cpu"
    args = parser.parse_args(["train", "--preset", "tiny", "--expert-parallel", "2", "--steps", "7", "--seed", "3",
                              "--out", "/tmp/x y", "--threads", "1", "--quiet"])
    again = parser.parse_args(train_argv(args))
    assert vars(again) == vars(args)


def test_placement_and_validation():
    assert expert_placement(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert expert_placement(4, 1) == [[0, 1, 2, 3]]
    for bad in (0, -1, 3, 2.0, True):
        with pytest.raises(ValueError):
            check_expert_parallel(8, bad)


def test_exchange_stats_derived_figures():
    s = ExchangeStats(tokens_per_rank=[3, 2], counts=[[1, 2, 0, 3], [0, 1, 1, 0]], placement=[[0, 1], [2, 3]],
                      dropped=[0, 1, 2, 0], bytes_per_pair=8)
    assert s.traffic == [[3, 3], [1, 1]]
    assert s.load_per_rank == [4, 4]
    assert s.dropped_per_rank == [1, 2]


# ----------------------------------------------------------------------------- the dashboard view


def test_saved_run_is_real_and_consistent():
    runs = sorted((ROOT / "assets" / "parallel").glob("*.json"))
    assert runs, "no saved expert-parallel run in assets/parallel"
    for path in runs:
        d = json.loads(path.read_text())
        P = d["world_size"]
        assert d["backend"] in ("gloo", "nccl") and len(d["placement"]) == P
        assert "torch.distributed.run" in d["command"]
        for L in d["layers"]:
            assert sum(L["tokens_per_rank"]) == d["n_tokens"]
            assert [sum(col) for col in zip(*L["traffic"])] == L["load_per_rank"]


def test_parallel_view_builds():
    import panel as pn
    from bokeh.models import Plot

    from app.views.parallel import gpu_table_rows, parallel_view

    view = parallel_view(ROOT / "assets" / "parallel" / "moe-n8-switch-p4.json")
    assert isinstance(view, pn.viewable.Viewable)
    panes = list(view.select(pn.pane.Bokeh))
    assert len(panes) == 3 and all(isinstance(b.object, Plot) for b in panes)   # traffic, load, drops
    traffic = next(b for b in panes if b.object.name == "parallel_traffic")
    # the heatmap's numbers are the run's layer-0 traffic matrix
    run = json.loads((ROOT / "assets" / "parallel" / "moe-n8-switch-p4.json").read_text())
    src = traffic.object.renderers[0].data_source.data
    assert sorted(src["v"]) == sorted(v for row in run["layers"][0]["traffic"] for v in row)
    # picking another layer redraws from that layer's matrix
    pick = next(iter(view.select(pn.widgets.RadioButtonGroup)))
    pick.value = 2
    src = traffic.object.renderers[0].data_source.data
    assert sorted(src["v"]) == sorted(v for row in run["layers"][2]["traffic"] for v in row)

    rows = {r["key"]: r for r in gpu_table_rows(gpu_gb=80, dtype="bf16")}
    ds = rows["deepseek-v3"]
    assert ds["gpus_total"] == -(-ds["total"] * 2 // (80 * 10**9)) and ds["gpus_total"] > ds["gpus_active"] >= 1


def test_parallel_view_lists_every_saved_run():
    import panel as pn

    from app.views.parallel import list_runs, parallel_view

    view = parallel_view()
    runs = [p.stem for p in list_runs()]
    if len(runs) > 1:
        choose = next(iter(view.select(pn.widgets.Select)))
        assert choose.options == runs
        choose.value = runs[-1]                       # switching runs rebuilds the card without error
        assert any(b.object.name == "parallel_traffic" for b in view.select(pn.pane.Bokeh))


def test_parallel_view_reports_a_broken_run_file(tmp_path):
    from app.views.parallel import load_run

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_run(bad)


def test_a_run_saved_before_the_renaming_reads_with_todays_names(tmp_path):
    """Runs and traces saved when the JSON said n_layers / active still load, under today's names."""
    from app.views.parallel import RUN_DIR, load_run

    shipped = sorted(RUN_DIR.glob("*.json"))[0]
    old = json.loads(shipped.read_text())
    old["model"]["n_layers"] = old["model"].pop("n_layer")
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_run(tmp_path / "old.json") == load_run(shipped)
    assert load_run(shipped)["model"]["n_layer"] == 4


if __name__ == "__main__":  # under torchrun: python -m torch.distributed.run ... tests/test_parallel.py OUT.json
    _distributed_checks(sys.argv[1])
