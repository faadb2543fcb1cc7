"""The training lab's app side without a browser: polling fills the plots, the trained model
downloads as a loadable safetensors checkpoint and can route text in the router state; queue and
shared-job status lines; a page that lost its connection stops its job."""
import io
import json
import time
import zipfile
from types import SimpleNamespace

from app.lab import TrainingLab, page_connected, queue_text
from app.state import RouterState
from moe_core.analysis.metrics import topk_overlap
from moe_core.model.checkpoint import load_file
from moe_core.train.lab import JobManager, Recipe, manager


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
    # router saturation: the router probed every 10 steps, each look against the last (OLMoE Fig. 20)
    sat = lab.sat_src.data
    probes = [s["probe"] for s in lab.job.runs[0].steps if "probe" in s]
    assert list(sat["step"]) == [10, 20] and len(probes) == 2
    assert sat["l0"][-1] == sat["l1"][-1] == 1.0
    assert sat["l0"][0] == topk_overlap(probes[0][0], probes[1][0]) < 1.0
    assert probes[1][0].shape == (512, 2)                                            # 4 windows of 128, k = 2

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
    # the Experiments tab runs on the lab model too, for this session only (never in the server's shared results)
    from app.views.experiments import ExperimentsView, _results

    ev = ExperimentsView(state=state)
    ev.pick.value, ev.screen.predicted = "token_ids", 1
    before = len(_results)
    ev.run_now()
    res = json.loads(ev.screen.result)
    assert res["model"] == "lab-model" and len(res["numbers"]["specialisation"]) == 2 and len(_results) == before
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

        def submit(self, recipes, alive=None):
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


def test_the_queue_text_gives_the_position_and_when_the_job_starts():
    assert queue_text({"queue_position": 3, "wait_s": 42.4}, 1) == (
        "Waiting for a free training slot: position 3 in the queue, starts in about 42 s "
        "(this server trains 1 job(s) at a time).")
    assert "starts in about 10 min" in queue_text({"queue_position": 30, "wait_s": 600}, 1)
    assert "estimated once a job has trained a few steps" in queue_text({"queue_position": 1, "wait_s": None}, 2)


def test_a_queued_and_a_shared_job_say_so_in_the_status(monkeypatch):
    import app.lab

    m = JobManager(max_running=1)
    monkeypatch.setattr(app.lab, "manager", lambda: m)
    first = m.submit([Recipe(steps=400, seed=81)])
    lab, doc, _ = _lab_in_a_document()
    from panel.io.state import set_curdoc
    with set_curdoc(doc):
        lab.seed.value = 82
        lab.start()
        lab._stop_polling()
    assert "position 1 in the queue" in lab.status.object
    other = TrainingLab()
    other.job = m.submit([Recipe(steps=400, seed=81)])
    deadline = time.monotonic() + 60
    while not first.snapshot()["runs"][0]["shown"] and time.monotonic() < deadline:
        time.sleep(0.05)
    other._show_progress(other.job.snapshot())
    assert "trained once for you and 1 other session(s)" in other.status.object
    first.cancel()
    other.cancel()
    lab.cancel()


def test_a_page_that_lost_its_connection_stops_its_job_within_5_s(monkeypatch):
    """The page's websocket closes (the session stays on the server for minutes): the job stops."""
    import app.lab

    m = JobManager(max_running=1)
    monkeypatch.setattr(app.lab, "manager", lambda: m)
    session = SimpleNamespace(destroyed=False, connection_count=1)       # Bokeh's ServerSession
    lab, doc, _ = _lab_in_a_document()
    lab._alive = page_connected(SimpleNamespace(session_context=SimpleNamespace(_session=session)))
    from panel.io.state import set_curdoc
    with set_curdoc(doc):
        lab.steps.value = 2000
        lab.seed.value = 91
        lab.start()
        lab._stop_polling()
    deadline = time.monotonic() + 60
    while lab.job.state != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    session.connection_count = 0
    t0 = time.monotonic()
    while not (lab.job.state == "cancelled" and m.running() == 0) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert lab.job.state == "cancelled" and m.running() == 0 and time.monotonic() - t0 < 5
    assert page_connected(None) is None and page_connected(SimpleNamespace(session_context=None)) is None


def test_a_new_train_keeps_figures_of_the_same_shape_and_relabels_them():
    """A class pressing Train at once: figures are made again only for another N, runs or bias plot."""
    lab = TrainingLab()
    loss_fig, share_fig = lab.loss_pane.object, lab.share_panes.objects[0].object
    lab._build_plots(Recipe(balancing="load_balance", seed=3), None)
    assert lab.loss_pane.object is loss_fig and lab.share_panes.objects[0].object is share_fig
    from bokeh.models import Legend
    legend = next(x for x in loss_fig.below if isinstance(x, Legend))
    assert "Load-balancing loss" in legend.items[0].label.value and legend.items[0].label.value.startswith("A: ")
    lab.layer.value = 1
    assert "layer 1" in share_fig.title.text and lab.share_panes.objects[0].object is share_fig
    lab._build_plots(Recipe(n_experts=4), None)
    assert lab.loss_pane.object is not loss_fig and len(lab.share_src[0].data) == 5     # step + e0..e3
