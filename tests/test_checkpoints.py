"""The shipped checkpoints are real, trained, honest about themselves, and safe to load;
training works with every balancing method."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from moe_core.model import checkpoint
from moe_core.analysis.specialisation import specialisation
from moe_core.model.checkpoint import CHECKPOINT_DIR, list_checkpoints, load, load_file
from moe_core.data.corpus import manifest
from moe_core.analysis.metrics import balance_metrics
from moe_core.model.gpt import MoEConfig
from moe_core.data.tokens import load_token_data
from moe_core.inference import evaluate
from moe_core.train.loop import PRESETS, TrainConfig, train

SHIPPED = ["moe-n4", "moe-n8", "moe-n16", "moe-n32", "moe-n8-nobalance", "moe-n8-bias", "moe-n8-switch", "moe-n8-hash",
           "moe-n8-untrained"]


@pytest.fixture(scope="module")
def data():
    return load_token_data()


@pytest.fixture(scope="module")
def held_out(data):
    return data.splits["eval"][:8192].tolist()


def test_every_preset_is_shipped_with_a_complete_card():
    docs = {d["name"]: d for d in list_checkpoints()}
    assert set(SHIPPED) <= set(docs)
    man = manifest()
    corpus_hash = hashlib.sha256("".join(man["splits"][s]["sha256_uncompressed"] for s in ("train", "eval"))
                                 .encode()).hexdigest()
    for name in SHIPPED:
        card = docs[name]["card"]
        for key in ("corpus_hash", "seed", "steps", "wall_s", "eval_loss", "balance", "nmi_category", "specialisation",
                    "weights_sha256"):
            assert key in card, (name, key)
        assert card["corpus_hash"] == corpus_hash
        assert docs[name]["recipe"]["preset"] == name
        assert len(card["balance"]) == docs[name]["config"]["n_layer"]
    assert sum(d["bytes"] for d in docs.values()) <= 44 * 2**20      # 9 fp16 checkpoints (42.4 MiB)


def test_same_expert_width_so_active_stays_while_total_grows():
    from moe_core.model.params import count_params

    reports = [count_params(load(n).model, top_k=2) for n in ("moe-n4", "moe-n8", "moe-n16", "moe-n32")]
    totals = [r.total for r in reports]
    assert totals == sorted(totals) and totals[-1] > 3 * totals[0]
    actives = [r.active_per_token for r in reports]
    assert max(actives) - min(actives) <= 4 * 128 * 32      # only the router grows with N


@pytest.mark.slow
def test_trained_model_beats_the_untrained_one_on_held_out_text(data):
    trained = evaluate(load("moe-n8").model, data, batches=8)       # the same windows the card used
    untrained = evaluate(load("moe-n8-untrained").model, data, batches=8)
    assert untrained > np.log(4096) - 0.5            # chance level for a 4096-token vocabulary
    assert trained < untrained - 2.0
    assert abs(trained - load("moe-n8").card["eval_loss"]) < 0.02  # the card's figure is reproducible (fp16 weights)


def test_layer0_experts_specialise_on_token_categories(held_out):
    trained = specialisation(load("moe-n8").model, held_out)["layers"][0]["nmi_category"]
    untrained = specialisation(load("moe-n8-untrained").model, held_out)["layers"][0]["nmi_category"]
    assert trained >= 0.2
    assert untrained < 0.1 < trained


def test_no_balancing_overloads_an_expert_and_balancing_does_not(held_out):
    from moe_core.inference import route_ids

    def busiest_top1_share(name):
        routings, _ = route_ids(load(name).model, held_out)
        return max(balance_metrics(r)["top1_max_share"] for r in routings)

    collapsed = busiest_top1_share("moe-n8-nobalance")
    balanced = busiest_top1_share("moe-n8")
    bias = busiest_top1_share("moe-n8-bias")
    assert collapsed > 0.5                     # one expert takes most first choices in some layer
    assert balanced < 0.4 and bias < 0.4
    assert collapsed > 1.5 * balanced


def test_switch_checkpoint_routes_top1_with_capacity():
    lm = load("moe-n8-switch")
    assert lm.config.scheme == "switch" and lm.info()["top_k_trained"] == 1


def test_loading_refuses_corrupt_or_mismatched_files(tmp_path):
    src = CHECKPOINT_DIR / "moe-n8"
    for ext in (".json", ".safetensors"):
        shutil.copy(src.with_suffix(ext), tmp_path / f"m{ext}")
    assert load_file(tmp_path / "m").config.n_experts == 8

    (tmp_path / "m.safetensors").write_bytes(b"\x80\x04not a safetensors file")   # e.g. a pickle
    with pytest.raises(ValueError, match="safetensors"):
        load_file(tmp_path / "m")

    shutil.copy(src.with_suffix(".safetensors"), tmp_path / "m.safetensors")
    doc = json.loads((tmp_path / "m.json").read_text())
    doc["config"]["n_experts"] = 16
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="shape|match"):
        load_file(tmp_path / "m")

    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_file(tmp_path / "m")
    with pytest.raises(ValueError, match="unknown model"):
        checkpoint.load("no-such-model")


TINY = dict(n_layer=2, n_head=2, d_model=64, d_ff=64, block_size=64, n_experts=4)


@pytest.mark.parametrize("model_kw", [
    dict(aux_loss_coef=0.01, z_loss_coef=0.001),
    dict(),                                                        # no balancing
    dict(scheme="noisy_topk", cv_loss_coef=0.01),                  # Shazeer CV^2
    dict(scheme="deepseek", bias_update_rate=0.01),                # aux-loss-free bias
    dict(scheme="switch", top_k=1, capacity_factor=1.25, aux_loss_coef=0.01),
    dict(scheme="expert_choice"),
    dict(scheme="base", top_k=1),
    dict(scheme="gshard", capacity_factor=2.0, aux_loss_coef=0.01),
    dict(n_shared=1, aux_loss_coef=0.01),
])
def test_training_a_few_steps_reduces_loss_with_every_balancing_method(data, model_kw):
    cfg = MoEConfig(**TINY, **model_kw)
    tc = TrainConfig(steps=25, batch_size=8, warmup_steps=5, eval_interval=0, eval_batches=1, lr=3e-3)
    seen = []
    result = train(cfg, tc, data=data, callback=seen.append)
    assert len(seen) == 25 and seen[-1].step == 25
    first = np.mean([s.ce_loss for s in seen[:3]])
    last = np.mean([s.ce_loss for s in seen[-3:]])
    assert last < first - 0.5, (first, last)
    if cfg.scheme == "deepseek":
        assert any(abs(b) > 0 for layer in seen[-1].bias for b in layer)   # the bias moved
    assert all(len(layer) == 4 for layer in seen[-1].load)


def test_train_can_be_stopped_and_every_preset_builds():
    from moe_core.train.loop import make_configs

    for name in PRESETS:
        m, t, p = make_configs(name)
        assert m.n_experts >= 1 and t.steps >= 0
    with pytest.raises(ValueError, match="unknown preset"):
        make_configs("moe-n999")
    result = train(MoEConfig(**TINY), TrainConfig(steps=50, batch_size=2, eval_interval=0, eval_batches=1),
                   should_stop=lambda: True)
    assert result.stopped and result.history == []
