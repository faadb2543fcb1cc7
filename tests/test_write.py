"""Watch it write (app/views/write.py): the view's state machine in plain Python, then the page in a browser.

Python: Write runs the prefill and schedules the decode steps; one tick adds one token and sends it alone;
Stop stops; a scheme that cannot generate is refused with generate()'s own sentence; the bins hold, per
expert, the new tokens whose first choice in the shown layer it is, exactly as generate() routed them.
Browser (marked ui): the tab streams tokens into the bins at the fast pace, the layer buttons redraw the
bins, Stop stops; the view fits a laptop, presenter mode and a 768 px window (screenshots in artifacts/).
"""
from __future__ import annotations

import json

import pytest

from app.dashboard import Dashboard
from app.share import parse_query
from app.state import RouterState
from app.views.write import (
    BABBLE,
    DEFAULT_PROMPT,
    WRITE_SPEEDS_MS,
    WriteView,
    expert_bins,
    schemes_that_write,
)
from moe_core.generate import GeneratedToken, generate


class Notes(list):
    def __call__(self, kind: str, message: str) -> None:
        self.append((kind, message))


def view(**state) -> tuple[WriteView, Notes]:
    notes = Notes()
    return WriteView(state=RouterState(**state), notify=notes), notes


def reference(v: WriteView, n: int) -> list[GeneratedToken]:
    """What generate() itself writes for the view's settings (the same model, routing, prompt and seed)."""
    s = v.state
    return list(generate(s.model, v.prompt.value, max_new_tokens=n, temperature=float(v.temperature.value),
                         seed=int(v.seed.value), request=s.request()))


def test_write_runs_the_prefill_at_once_then_each_tick_adds_one_token():
    v, notes = view()
    assert v.status == "idle" and v.prompt.value == DEFAULT_PROMPT and v.tokens == []
    v.new_tokens.value = 5
    assert v.write() is True
    assert v.status == "writing" and notes == []
    n_prompt = v.n_prompt
    assert n_prompt > 1 and [t.phase for t in v.tokens] == ["prefill"] * n_prompt
    run = json.loads(v.screen.run)
    assert [r["i"] for r in run["toks"]] == list(range(n_prompt)) and all(r["p"] == 1 for r in run["toks"])
    assert run["n"] == 8 and run["layers"] == 4 and len(run["colors"]) == 8
    assert v.screen.writing and not v.stop_btn.disabled and v._cb is not None
    for step in range(1, 6):
        v.tick()
        assert len(v.tokens) == n_prompt + step and v.tokens[-1].phase == "decode"
        chunk = json.loads(v.screen.chunk)              # the increment the page gets: this token only
        assert chunk["i"] == n_prompt + step - 1 and len(chunk["toks"]) == 1
        assert chunk["toks"][0]["t"] == v.tokens[-1].text and chunk["toks"][0]["e"] == v.tokens[-1].experts
    assert v.status == "done" and v._cb is None and v.stop_btn.disabled and not v.screen.writing
    assert v.screen.status == "done: 5 new tokens"
    v.tick()
    assert len(v.tokens) == n_prompt + 5                  # done: a late tick adds nothing


def test_the_view_writes_what_generate_writes():
    v, _ = view()
    v.new_tokens.value = 12
    v.write()
    for _ in range(12):
        v.tick()
    ref = reference(v, 12)
    assert [(t.id, t.phase, t.experts) for t in v.tokens] == [(t.id, t.phase, t.experts) for t in ref]


def test_stop_stops_and_keeps_what_was_written():
    v, _ = view()
    v.write()
    for _ in range(3):
        v.tick()
    v.stop()
    assert v.status == "stopped" and v._cb is None and v._gen is None
    assert v.screen.status == "stopped after 3 new tokens" and not v.screen.writing and v.stop_btn.disabled
    n = len(v.tokens)
    v.tick()
    assert len(v.tokens) == n
    # a new Write stops the old run and starts again from the prompt
    assert v.write() and v.status == "writing" and len(v.tokens) == v.n_prompt
    assert json.loads(v.screen.run)["id"] == 2


@pytest.mark.parametrize("scheme", ["switch", "gshard", "expert_choice", "base"])
def test_a_scheme_that_cannot_generate_is_refused_with_generates_sentence(scheme):
    v, notes = view()
    v.state.scheme = scheme
    notice = json.loads(v.screen.notice)
    assert notice["level"] == "warn" and schemes_that_write() in notice["text"]
    before = v.screen.run
    assert v.write() is False
    assert v.status == "refused" and v._cb is None and v.screen.run == before
    [(kind, message)] = notes
    assert kind == "error" and "softmax_topk, noisy_topk, deepseek" in message and scheme in message
    v.state.scheme = "softmax_topk"                       # back to a scheme that writes
    assert json.loads(v.screen.notice)["level"] == "ok"
    assert v.write() is True


def test_the_bins_hold_each_new_token_under_its_first_expert_in_the_shown_layer():
    v, _ = view()
    v.new_tokens.value = 16
    v.write()
    for _ in range(16):
        v.tick()
    new = [t for t in reference(v, 16) if t.phase == "decode"]
    shown = []
    for layer in range(4):
        v.screen.layer = layer
        bins = v.bins()
        assert bins == [[t.position for t in new if t.experts[layer][0] == e] for e in range(8)]
        assert sorted(p for b in bins for p in b) == [t.position for t in new]     # every new token, once
        shown.append(bins)
    assert len({json.dumps(b) for b in shown}) > 1        # the layers route differently
    # the prompt's tokens are in the bins too (drawn outlined): phase=None shows them all
    assert sum(map(len, v.bins(layer=0, phase=None))) == v.n_prompt + 16


def test_expert_bins_by_hand():
    def tok(i, phase, experts):
        return GeneratedToken(i, 0, "x", phase, experts, [[1.0]] * len(experts))

    toks = [tok(0, "prefill", [[1], [0]]), tok(1, "decode", [[1, 2], [2, 1]]), tok(2, "decode", [[0, 1], [2, 0]])]
    assert expert_bins(toks, 0, 3) == [[2], [0, 1], []]
    assert expert_bins(toks, 1, 3, "decode") == [[], [], [1, 2]]


def test_the_numbers_shown_come_from_the_run():
    v, _ = view()
    v.write()
    for _ in range(4):
        v.tick()
    line = v.screen.line
    assert f"prefill: {v.n_prompt} prompt tokens in one pass, {v.prefill_ms:.1f} ms" in line
    mean = sum(v.step_ms) / 4
    assert f"4 steps at {mean:.1f} ms each ({1000 / mean:,.0f} tokens/s" in line
    assert "one token every 0.5 s" in line
    assert "babble" in BABBLE and "Watch the routing" in BABBLE


def test_the_pace_sets_the_callbacks_period():
    v, _ = view()
    v.pace.value = "fast"
    v.write()
    assert v._cb.period == WRITE_SPEEDS_MS["fast"]
    v.pace.value = "slow"
    assert v.speed == "slow" and v._cb.period == WRITE_SPEEDS_MS["slow"]
    v.stop()


def test_a_prompt_that_leaves_little_room_writes_what_fits_and_an_empty_one_is_refused():
    v, notes = view()
    v.prompt.value = "1 2 3 4 5 6 7 8 9 " * 14                # 252 tokens: 4 left in the context of 256
    v.new_tokens.value = 40
    assert v.write()
    assert v.n_new == 256 - v.n_prompt and notes[0][0] == "warning" and "context is 256" in notes[0][1]
    v.prompt.value = ""
    assert v.write() is False and v.status == "refused" and "empty" in notes[-1][1]


def test_the_end_of_text_token_ends_the_run():
    v, _ = view()
    v.write()
    eot = GeneratedToken(v.n_prompt, 0, "<|endoftext|>", "decode", [[3, 1]] * 4, [[0.6, 0.4]] * 4)
    v._gen = iter([eot])
    v.tick()
    assert v.status == "done" and "end-of-text" in v.screen.status


def test_the_page_can_ask_for_the_whole_run_and_a_bad_layer_is_put_back():
    v, _ = view()
    v.write()
    v.tick()
    v.tick()
    v.screen.resync += 1
    tail = json.loads(v.screen.tail)
    assert [r["i"] for r in tail["toks"]] == [t.position for t in v.tokens] and tail["run"] == 1
    v.screen.layer = 2
    v.screen.layer = 7                                     # the model has 4 layers
    assert v.screen.layer == 2


def test_the_session_ending_stops_the_callback():
    v, _ = view()
    v.write()
    v._on_session_end(None)
    assert v._cb is None and v._gen is None and v.status == "stopped"


def test_the_dashboard_has_the_tab_and_links_can_open_it():
    d = Dashboard()
    d.page_layout()
    assert "write" in d.tab_names
    d.show_tab("write")
    assert isinstance(d.writer, WriteView) and d.writer.state is d.state
    assert "view-write" in d._views["write"].css_classes
    _, page, msgs = parse_query({"tab": [b"write"]})
    assert page["tab"] == "write" and msgs == []


# -- the page, in a browser --------------------------------------------------------------------------------

WRITE = "(() => { const out = []; const walk = (r) => { out.push(...r.querySelectorAll('.write')); " \
        "r.querySelectorAll('*').forEach(e => { if (e.shadowRoot) walk(e.shadowRoot); }); }; walk(document); " \
        "return out[0] || null; })()"
DOM_BINS = f"""() => [...{WRITE}.querySelectorAll('.wcol')].map(
    c => [...c.querySelectorAll('.chip.dec')].map(x => Number(x.dataset.i)))"""


def open_write(page, url: str, pace: str = "fast"):
    from playwright.sync_api import expect

    from tests.test_ui import open_app

    errors = open_app(page, url)
    page.get_by_text("Watch it write", exact=True).first.click()
    page.wait_for_function(f"() => {WRITE} !== null && {WRITE}.querySelectorAll('.wcol').length === 8")
    page.locator(".write-controls").get_by_role("button", name=pace, exact=True).click()
    expect(page.locator(".write-controls").get_by_role("button", name=pace, exact=True)).to_have_class(
        "bk-btn bk-btn-default bk-active")
    return errors


def press_write(page) -> None:
    page.locator(".write-controls").get_by_role("button", name="\u270e Write").click()


def written_count(page) -> int:
    return page.evaluate(f"() => Number({WRITE}.dataset.count)")


@pytest.mark.ui
def test_the_page_streams_tokens_into_the_bins_and_stop_stops(page, app_url):
    from tests.conftest import ARTIFACTS
    from tests.test_ui import IGNORED

    errors = open_write(page, app_url)
    press_write(page)
    page.wait_for_function(f"() => Number({WRITE}.dataset.count) >= 8")
    page.locator(".write-controls").get_by_role("button", name="\u25a0 Stop").click()
    page.wait_for_function(f"() => {WRITE}.querySelector('.pill').textContent.startsWith('stopped after')")
    n = int(page.evaluate(f"() => {WRITE}.querySelector('.pill').textContent").split()[2])
    page.wait_for_timeout(3 * WRITE_SPEEDS_MS["fast"])
    assert written_count(page) == n >= 8                    # Stop stopped: no token after it
    # every new token is a chip in exactly one bin: its first expert's, as generate() routed it
    v = WriteView(state=RouterState())
    v.temperature.value, v.seed.value = 0.8, 1
    ref = reference(v, n)
    new = [t for t in ref if t.phase == "decode"]
    n_prompt = len(ref) - n
    layer0 = page.evaluate(DOM_BINS)
    assert sum(map(len, layer0)) == n
    assert layer0 == expert_bins(new, 0, 8)
    page.screenshot(path=str(ARTIFACTS / "write-stopped.png"))
    # another layer: the same tokens, other bins
    page.locator(".view-write-bins button.layer-btn", has_text="Layer 2").click()
    page.wait_for_function(f"() => {WRITE}.querySelector('.layer-btn.on').dataset.layer === '2'")
    layer2 = page.evaluate(DOM_BINS)
    assert layer2 == expert_bins(new, 2, 8) and layer2 != layer0 and sum(map(len, layer2)) == n
    # the prompt's tokens are drawn apart (outlined), in the text and in the bins
    pre = page.evaluate(f"() => {WRITE}.querySelectorAll('.wbins .chip.pre').length")
    assert pre == n_prompt == page.evaluate(f"() => {WRITE}.querySelectorAll('.wtext .wtok.pre').length")
    stats = page.evaluate(f"() => {WRITE}.querySelector('.wstats').textContent")
    assert stats.startswith(f"prefill: {n_prompt} prompt tokens in one pass") and f"{n} steps at" in stats
    assert [e for e in errors if not any(i in e for i in IGNORED)] == []


LAYOUT = ("app-header", "write-controls", "view-write-text", "view-write-bins", "view-write-stats")


@pytest.mark.ui
@pytest.mark.parametrize("size, presenter", [((1366, 768), False), ((1366, 768), True), ((1920, 1080), False),
                                             ((768, 1024), False)], ids=["1366", "1366-presenter", "1920", "768"])
def test_the_view_fits_the_window(browser, app_url, size, presenter):
    from tests.test_ui_layout import check_boxes, local_only

    ctx = browser.new_context(viewport={"width": size[0], "height": size[1]})
    outside = local_only(ctx)
    page = ctx.new_page()
    name = f"write-{size[0]}" + ("-presenter" if presenter else "")
    try:
        open_write(page, app_url + ("?presenter=1" if presenter else ""))
        press_write(page)
        page.wait_for_function(f"() => Number({WRITE}.dataset.count) >= 12")
        check_boxes(page, name, LAYOUT, LAYOUT)
        # the bins are wide enough to read a chip: 8 columns side by side, none narrower than 60 px
        cols = page.evaluate(f"() => [...{WRITE}.querySelectorAll('.wcol')].map(c => c.getBoundingClientRect().width)")
        assert len(cols) == 8 and min(cols) >= 60, cols
        page.locator(".write-controls").get_by_role("button", name="\u25a0 Stop").click()
    finally:
        ctx.close()
    assert outside == [], f"the page asked the internet for {outside}"
