"""The training lab's app side without a browser: polling fills the plots, the trained model
downloads as a loadable safetensors checkpoint and can route text in the router state."""
import io
import time
import zipfile

from app.lab import TrainingLab
from app.state import RouterState
from moe_core.model.checkpoint import load_file
from moe_core.train.lab import Recipe, manager


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
    assert state.balancing == state.LAB_BALANCING and state.model.name == "lab-model"
    res = state.route()
    assert res is not None and len(res.routings) == 2
    assert state.param.layer.objects == [0, 1]
    assert messages and messages[-1][0] == "success"
    state.balancing = "balanced (aux loss)"          # back to a shipped model
    assert len(state.route().routings) == 4


def test_bad_recipe_in_the_lab_notifies_instead_of_failing():
    messages = []
    lab = TrainingLab(notify=lambda kind, msg: messages.append((kind, msg)))
    lab.scheme.value = "softmax_topk"
    lab.balancing.value = "deepseek_bias"           # needs the DeepSeek scheme
    lab.start()
    assert lab.job is None and messages[0][0] == "error" and "DeepSeek" in messages[0][1]


class PageMirror:
    """The lab's sources as a browser holds them: it applies the document events the server sends.

    Bokeh serialises an event when it is sent, so a reset of `data` followed by a stream in the
    same hold reaches the page as the reset carrying the streamed rows, then the stream again."""

    def __init__(self, doc):
        self.data = {}
        doc.on_change(self._apply)

    def _apply(self, event):
        kind = type(event).__name__
        if kind == "ColumnDataChangedEvent":            # read at send time, like the serialiser does
            cols = event.cols or list(event.model.data)
            self.data.setdefault(event.model.name, {}).update({c: list(event.model.data[c]) for c in cols})
        elif kind == "ColumnsStreamedEvent":
            mine = self.data.setdefault(event.model.name, {})
            for c, v in event.data.items():
                mine[c] = mine.get(c, []) + list(v)
        elif kind == "ModelChangedEvent" and event.attr == "data":
            self.data[event.model.name] = {c: list(v) for c, v in event.model.data.items()}

    def steps(self, name):
        return self.data.get(name, {}).get("step", [])


def _lab_in_a_document():
    """A lab whose sources live in a document that Panel treats as a served page's (events are sent)."""
    from bokeh.document import Document
    from panel.io.state import state
    lab = TrainingLab()
    doc = Document()
    state._connected[doc] = True           # else Panel drops held events: the page would be sent whole
    state._thread_id_[doc] = state._current_thread   # and this is its server's thread: a hold ends as it exits
    for srcs in (lab.loss_src, lab.eval_src, lab.busy_src, lab.bal_src, lab.share_src, lab.bias_src):
        for s in srcs:
            doc.add_root(s)
    return lab, doc, PageMirror(doc)


def _finished_job(recipe):
    job = manager().submit([recipe])
    deadline = time.monotonic() + 120
    while not job.finished and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.state == "done"
    return job


def test_the_page_gets_each_step_once_when_train_finds_steps_already_made(monkeypatch):
    """Train resets the plots, and the job may have trained a step or two before the first poll
    (CI once saw 20 steps drawn as more than 20 and waited for ever): every step reaches the page once."""
    import app.lab
    from panel.io.document import hold
    from panel.io.state import set_curdoc

    job = _finished_job(Recipe(steps=20, seed=1))

    class Given:                   # the manager hands out a job whose steps are all made already
        max_running = 1

        def submit(self, recipes):
            return job

    monkeypatch.setattr(app.lab, "manager", lambda: Given())
    lab, doc, page = _lab_in_a_document()
    with set_curdoc(doc):
        lab.seed.value = 1
        with hold(doc):            # as a click runs: the handler's own hold, inside Panel's
            lab.start()
        lab.poll()
        lab._stop_polling()
    assert page.steps("lab_loss_0") == list(range(1, 21))
    assert page.steps("lab_share_0") == list(range(1, 21))
    assert page.steps("lab_balance_0") == list(range(1, 21))


def test_switching_the_layer_after_training_draws_each_step_once():
    from panel.io.state import set_curdoc

    lab, doc, page = _lab_in_a_document()
    with set_curdoc(doc):
        lab.job = _finished_job(Recipe(steps=20, balancing="deepseek_bias", scheme="deepseek"))
        lab._build_plots(lab.job.runs[0].recipe, None)
        lab._since = [0]
        lab.poll()
        for layer in (1, 0):
            lab.layer.value = layer
            assert page.steps("lab_share_0") == list(range(1, 21)), layer
            assert page.steps("lab_bias_0") == list(range(1, 21)), layer
            want = [s["top1_share"][layer][0] for s in lab.job.runs[0].steps]
            assert page.data["lab_share_0"]["e0"] == want
