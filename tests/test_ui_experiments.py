"""The Experiments tab (app/views/experiments.py): predict, run, see; in Python, then in a browser.

Python: Run waits for a prediction; a run shows the result run_experiment computes for the Router tab's model;
another experiment or model clears it; a value the page could not send is refused. Browser (marked ui): a
student predicts, runs, and the page shows the model's own finding and figure; the layer buttons redraw the
heatmap; the tab fits a laptop, presenter mode, a projector and a 768 px window (screenshots in artifacts/).
"""
from __future__ import annotations

import json
import time

import pytest

from app.dashboard import Dashboard
from app.share import parse_query
from app.state import RouterState
from app.views.experiments import ExperimentScreen, ExperimentsView
from moe_core.experiments import EXPERIMENTS, run_experiment


class Notes(list):
    def __call__(self, kind: str, message: str) -> None:
        self.append((kind, message))


def view(**state) -> tuple[ExperimentsView, Notes, list]:
    notes, opened = Notes(), []
    return ExperimentsView(state=RouterState(**state), notify=notes, open_tab=opened.append), notes, opened


def test_run_waits_for_a_prediction_then_shows_what_the_model_gives():
    v, notes, _ = view()
    assert v.pick.value == "same_token" and v.run_btn.disabled and json.loads(v.screen.result) == {}
    spec = json.loads(v.screen.spec)
    assert spec["choices"] == list(EXPERIMENTS["same_token"].choices) and spec["model"] == "moe-n8"
    v.pick.value = "token_ids"
    v.screen.predicted = 1
    assert not v.run_btn.disabled
    v.run_now()
    res = json.loads(v.screen.result)
    assert res == json.loads(json.dumps(run_experiment("token_ids", v.state.model)))
    assert v.screen.status == "" and notes == [] and not v.run_btn.disabled


def test_another_experiment_or_model_clears_the_result_and_the_prediction():
    v, _, _ = view()
    v.pick.value = "coactivation"
    v.screen.predicted = 0
    v.run_now()
    assert json.loads(v.screen.result)["name"] == "coactivation"
    v.state.n_experts = 16
    assert json.loads(v.screen.result) == {} and v.screen.predicted == -1 and v.run_btn.disabled
    assert json.loads(v.screen.spec)["model"] == "moe-n16"
    v.screen.predicted = 1
    v.run_now()
    assert json.loads(v.screen.result)["model"] == "moe-n16"
    v.pick.value = "domains"
    assert json.loads(v.screen.result) == {} and v.screen.predicted == -1


def test_a_result_that_arrives_after_the_student_moved_on_is_not_shown():
    v, notes, _ = view()
    v.pick.value = "token_ids"
    v.screen.predicted = 1
    assert v._start() and v.run_btn.disabled              # computing in the worker thread...
    result = v.compute()
    v.pick.value = "coactivation"                         # ...while the student picks another experiment
    v._finish(result)
    assert json.loads(v.screen.result) == {} and json.loads(v.screen.spec)["name"] == "coactivation"
    assert not v.running and notes == []


def test_a_bad_token_gets_a_notification_and_nothing_runs():
    v, notes, _ = view()
    v.token.value = "two words"
    v.screen.predicted = 0
    v.run_now()
    assert notes and notes[-1][0] == "warning" and "not one" in notes[-1][1]
    assert json.loads(v.screen.result) == {} and v.screen.status.startswith("Not run:")


def test_an_experiment_on_a_model_it_does_not_fit_says_why():
    v, notes, _ = view()
    v.state.balancing = "Switch top-1"                     # k = 1: no pairs to count
    assert v.state.model_info["name"] == "moe-n8-switch"
    v.pick.value = "coactivation"
    v.screen.predicted = 0
    v.run_now()
    assert "at least 2 experts per token" in notes[-1][1]


def test_saturation_is_checked_on_the_sessions_training_lab_run():
    from moe_core.train.lab import Recipe, manager
    from app.lab import TrainingLab

    v, notes, opened = view()
    v.pick.value = "saturation"
    assert v.lab_btn.visible and "Training lab" in v.screen.status
    v.lab_btn.clicks += 1
    assert opened == ["lab"]
    v.screen.predicted = 0
    v.run_now()                                     # no lab run yet: it says what to do
    assert "no finished Training-lab run" in notes[-1][1] and json.loads(v.screen.result) == {}
    lab = TrainingLab()
    lab.job, lab._since = manager().submit([Recipe(steps=30, balancing="load_balance")]), [0]
    lab._build_plots(Recipe(steps=30, balancing="load_balance"), None)
    while not lab.job.finished:
        lab.poll()
        time.sleep(0.05)
    lab.poll()
    v._lab_run = lab.saturation_run
    v.run_now()
    res = json.loads(v.screen.result)
    assert res["numbers"]["steps"] == [10, 20, 30] and res["figure"]["kind"] == "lines"
    assert list(lab.sat_src.data["l0"]) == [row[0] for row in res["numbers"]["overlap_with_final"]]


def test_the_page_cannot_send_a_prediction_that_does_not_exist():
    with pytest.raises(ValueError):
        ExperimentScreen(predicted=10)
    with pytest.raises(ValueError):
        ExperimentScreen(predicted=-2)


def test_the_dashboard_has_the_tab_and_links_can_open_it():
    d = Dashboard()
    d.page_layout()
    d.show_tab("experiments")
    assert isinstance(d.experiments, ExperimentsView) and d.experiments.state is d.state
    _, page, msgs = parse_query({"tab": [b"experiments"]})
    assert page["tab"] == "experiments" and msgs == []


# -- the page, in a browser --------------------------------------------------------------------------------

EXP = "(() => { const out = []; const walk = (r) => { out.push(...r.querySelectorAll('.exp')); " \
      "r.querySelectorAll('*').forEach(e => { if (e.shadowRoot) walk(e.shadowRoot); }); }; walk(document); " \
      "return out[0] || null; })()"


def open_experiment(page, url: str, index: int):
    from tests.test_ui import open_app

    errors = open_app(page, url)
    page.get_by_text("Experiments", exact=True).first.click()
    page.wait_for_function(f"() => {EXP} !== null && {EXP}.querySelectorAll('button.choice').length > 0")
    page.locator(".experiment-controls select").select_option(index=index)
    name = list(EXPERIMENTS)[index]
    page.wait_for_function(f"() => {EXP}.querySelector('.etitle').textContent === {json.dumps(EXPERIMENTS[name].title)}")
    return errors


def predict_and_run(page, choice: int) -> None:
    page.locator(".exp button.choice").nth(choice).click()
    page.wait_for_function(f"() => {EXP}.querySelector('button.choice.on') !== null")
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_function(f"() => {EXP}.querySelector('.verdict') !== null", timeout=90_000)


@pytest.mark.ui
def test_a_student_predicts_runs_and_sees_the_models_own_numbers(page, app_url):
    from tests.test_ui import IGNORED

    errors = open_experiment(page, app_url, list(EXPERIMENTS).index("domains"))
    assert page.get_by_role("button", name="Run", exact=True).is_disabled()      # predict first
    predict_and_run(page, 1)
    ref = run_experiment("domains", RouterState().model)
    assert page.evaluate(f"() => {EXP}.querySelector('.finding').textContent") == ref["finding"]
    right = page.evaluate(f"() => [...{EXP}.querySelectorAll('button.choice')].findIndex(b => b.classList.contains('right'))")
    assert right == ref["answer"]
    verdict = page.evaluate(f"() => {EXP}.querySelector('.verdict').textContent")
    assert verdict.startswith("Your prediction holds" if ref["answer"] == 1 else "Not what you predicted")
    # the heatmap: the layer the finding names first; another layer redraws other numbers
    cells = lambda: page.evaluate(f"() => [...{EXP}.querySelectorAll('.cell')].map(c => c.textContent)")  # noqa: E731
    first = cells()
    layer = ref["figure"]["layer"]
    want = [f"{v:.1f}\u00d7" for row in ref["figure"]["layer_values"][layer] for v in row]
    assert first == want
    other = (layer + 1) % 4
    page.locator(".exp button.layer-btn", has_text=f"Layer {other}").click()
    page.wait_for_function(f"() => {EXP}.querySelector('.layer-btn.on').textContent === 'Layer {other}'")
    assert cells() == [f"{v:.1f}\u00d7" for row in ref["figure"]["layer_values"][other] for v in row] != first
    assert [e for e in errors if not any(i in e for i in IGNORED)] == []


LAYOUT = ("app-header", "experiment-controls", "ehead", "question", "choices", "verdict", "finding", "figure")


@pytest.mark.ui
@pytest.mark.parametrize("experiment", ["same_token", "domains", "coactivation", "learned_vs_hash"])
@pytest.mark.parametrize("size, presenter", [((1366, 768), False), ((1366, 768), True), ((1920, 1080), False),
                                             ((768, 1024), False)], ids=["1366", "1366-presenter", "1920", "768"])
def test_the_tab_fits_the_window(browser, app_url, experiment, size, presenter):
    from tests.test_ui_layout import check_boxes, local_only

    ctx = browser.new_context(viewport={"width": size[0], "height": size[1]})
    outside = local_only(ctx)
    page = ctx.new_page()
    name = f"experiments-{experiment}-{size[0]}" + ("-presenter" if presenter else "")
    try:
        open_experiment(page, app_url + ("?presenter=1" if presenter else ""), list(EXPERIMENTS).index(experiment))
        predict_and_run(page, 0)
        check_boxes(page, name, LAYOUT, LAYOUT)
    finally:
        ctx.close()
    assert outside == []
