"""The training lab's app side without a browser: polling fills the plots, the trained model
downloads as a loadable safetensors checkpoint and can route text in the router state."""
import io
import time
import zipfile

from app.lab import TrainingLab
from app.state import RouterState
from moe_core.checkpoint import load_file
from moe_core.lab import Recipe, manager


def test_lab_job_to_plots_to_download_to_router(tmp_path):
    state = RouterState(text="for i in range(10):\n    print(i)")
    state.route()
    messages = []
    lab = TrainingLab(router_state=state, notify=lambda kind, msg: messages.append((kind, msg)))
    lab.job = manager().submit([Recipe(steps=20, balancing="load_balance")])
    lab._since = [0]
    deadline = time.monotonic() + 120
    while not lab.job.finished and time.monotonic() < deadline:
        lab.poll()
        time.sleep(0.1)
    lab.poll()
    assert lab.job.state == "done"
    assert list(lab.loss_src[0].data["step"]) == list(range(1, 21))
    assert len(lab.share_src[0].data["e0"]) == 20 and not lab.use_btn.disabled
    bal = lab.bal_src[0].data
    assert len(bal["max_over_mean"]) == 20 and min(bal["max_over_mean"]) >= 1.0     # max >= mean, always
    assert all(0 < lb <= 8 for lb in bal["load_balance"])                            # N sum f P is in (0, N]

    blob = lab._download().getvalue()
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        assert sorted(z.namelist()) == ["lab-model.json", "lab-model.safetensors"]
        z.extractall(tmp_path)
    loaded = load_file(tmp_path / "lab-model")
    assert loaded.config.n_layer == 2 and loaded.card["steps"] == 20

    lab.use_model()
    assert state.variant == state.LAB_VARIANT and state.model.name == "lab-model"
    res = state.route()
    assert res is not None and len(res.routings) == 2
    assert state.param.layer.objects == ["all", 0, 1]
    assert messages and messages[-1][0] == "success"
    state.variant = "balanced (aux loss)"          # back to a shipped model
    assert len(state.route().routings) == 4


def test_bad_recipe_in_the_lab_notifies_instead_of_failing():
    messages = []
    lab = TrainingLab(notify=lambda kind, msg: messages.append((kind, msg)))
    lab.scheme.value = "softmax_topk"
    lab.balancing.value = "deepseek_bias"           # needs the DeepSeek scheme
    lab.start()
    assert lab.job is None and messages[0][0] == "error" and "DeepSeek" in messages[0][1]
