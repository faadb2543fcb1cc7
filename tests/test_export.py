"""Export (JSON/CSV trace, PyTorch snippet) and the scale-it-up measurement: plain Python, no browser."""
from __future__ import annotations

import contextlib
import csv
import html
import io
import json

import pytest
import torch

from app.state import RouterState
from moe_core.model.checkpoint import load
from moe_core.cli import main
from moe_core.analysis.export import (
    CSV_COLUMNS, export_filename, pytorch_snippet, spreadsheet_safe, trace_csv, trace_json, trace_rows,
)
from moe_core.inference import route_text
from moe_core.perf.scale import ScaleRunner, measure_scale, read_result, summary

TEXT = "def add(a, b):\n    return a + b  # 42"
HOSTILE = [
    'He said "hi" and \'bye\' \\ back\\slash \\n not a newline',
    '"""triple""" and \'\'\'single triple\'\'\'\nsecond line\r\nthird\ttab',
    '"); import os; os.system("echo pwned")  # \u202e bidi \x00 nul \u2028 line sep',
    "=HYPERLINK(\"http://x\")\n+1\n-2\n@SUM(A1)\n\t=cmd|' /C calc'!A0",
]
REQUESTS = [
    {"scheme": "softmax_topk", "top_k": 2},
    {"scheme": "softmax_topk", "top_k": 3},
    {"scheme": "switch", "capacity_factor": 0.5},
    {"scheme": "expert_choice", "capacity_factor": 1.0},
    {"scheme": "base"},
]


@pytest.fixture(scope="module")
def model():
    return load("moe-n8")


def cli_args(req: dict) -> list[str]:
    args = ["--scheme", req["scheme"]]
    if "top_k" in req:
        args += ["--top-k", str(req["top_k"])]
    if "capacity_factor" in req:
        args += ["--capacity-factor", str(req["capacity_factor"])]
    return args


def run_snippet(code: str) -> dict:
    """Execute a generated snippet in a fresh namespace (its prints swallowed); return its globals."""
    ns: dict = {"__name__": "__snippet__"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, "<snippet>", "exec"), ns)
    return ns


def same_routing(a, b) -> bool:
    return all(torch.equal(x.indices, y.indices) and torch.equal(x.dropped, y.dropped)
               and torch.allclose(x.weights, y.weights) for x, y in zip(a.routings, b.routings, strict=True))


# ----------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: "-".join(map(str, r.values())))
def test_json_trace_is_exactly_the_cli_output(model, req, capsys):
    assert main(["route", TEXT, "--json", *cli_args(req)]) == 0
    out = capsys.readouterr().out
    res = route_text(model, TEXT, **req)
    assert out == trace_json(res, model) + "\n"
    d = json.loads(out)
    assert d["scheme"] == req["scheme"] and d["model"]["name"] == "moe-n8"


def test_json_trace_keeps_unicode_text(model):
    text = "caf\u00e9 \u201cquoted\u201d \u65e5\u672c"
    d = json.loads(trace_json(route_text(model, text), model))
    assert "".join(t["text"] for t in d["tokens"]) == text


# ----------------------------------------------------------------------------- CSV


def read_csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def test_csv_has_one_row_per_router_choice_and_matches_the_result(model):
    res = route_text(model, "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 " + TEXT, scheme="switch", capacity_factor=0.5)
    text = trace_csv(res, model)
    rows = read_csv(text)
    assert list(rows[0]) == list(CSV_COLUMNS)
    n_choices = sum(int((r.choices >= 0).sum()) for r in res.routings)
    assert len(rows) == n_choices
    assert any(row["dropped"] == "1" for row in rows), "capacity 0.5 must drop something"
    for row in rows:
        li, t, e = int(row["layer"]), int(row["token"]), int(row["expert"])
        r = res.routings[li]
        assert float(row["weight"]) == pytest.approx(float(r.combine[t, e]), abs=1e-6)
        assert float(row["prob"]) == pytest.approx(float(r.probs[t, e]), abs=1e-6)
        assert row["dropped"] == str(int(r.dropped[t, e]))
        tok = res.tokens[t]
        assert (int(row["char_start"]), int(row["char_end"])) == (tok.start, tok.end)
    for li, r in enumerate(res.routings):          # kept rows add up to the expert loads
        kept = [0] * r.n_experts
        for row in rows:
            if int(row["layer"]) == li and row["dropped"] == "0":
                kept[int(row["expert"])] += 1
        assert kept == r.load.tolist()


def test_csv_ranks_follow_the_routers_order(model):
    res = route_text(model, TEXT, top_k=3)
    rows = [r for r in trace_rows(res) if r["layer"] == 1 and r["token"] == 4]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert [r["expert"] for r in rows] == res.routings[1].choices[4].tolist()


def test_csv_neutralises_spreadsheet_formulas(model):
    res = route_text(model, HOSTILE[3])
    rows = read_csv(trace_csv(res, model))
    texts = {int(r["token"]): r["token_text"] for r in rows}
    assert len(texts) == len(res.tokens)
    for t, cell in texts.items():
        original = res.tokens[t].text
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r", "\n"))
        if original.startswith(("=", "+", "-", "@", "\t", "\r", "\n")):
            assert cell == "'" + original
        else:
            assert cell == original
    assert any(cell.startswith("'") for cell in texts.values())


def test_spreadsheet_safe():
    assert spreadsheet_safe("=1+1") == "'=1+1"
    assert spreadsheet_safe("@SUM(A1)") == "'@SUM(A1)"
    assert spreadsheet_safe("\t=1") == "'\t=1"
    assert spreadsheet_safe("a=1") == "a=1"
    assert spreadsheet_safe("") == ""


def test_export_filename():
    assert export_filename("moe-n8", {"scheme": "softmax_topk", "top_k": 2}, "json") == \
        "routing-moe-n8-softmax_topk-k2.json"
    assert export_filename("moe-n8", {"scheme": "switch", "capacity_factor": 1.25}, "csv") == \
        "routing-moe-n8-switch-cf1.25.csv"
    assert "/" not in export_filename("../../etc", {"scheme": "x"}, "json")


# ----------------------------------------------------------------------------- snippet


@pytest.mark.parametrize("text", HOSTILE, ids=["quotes", "triple-quotes", "injection", "formulas"])
def test_snippet_compiles_and_reproduces_the_routing_for_hostile_text(model, text):
    req = {"scheme": "switch", "capacity_factor": 0.75}
    code = pytorch_snippet(model, req, text)
    assert "pwned" not in code.split("text = ", 1)[0]     # the text only appears inside its literal
    ns = run_snippet(code)
    assert ns["text"] == text
    assert same_routing(ns["result"], route_text(model, text, **req))
    assert ns["y"].shape == (len(ns["result"].tokens), model.config.d_model)


@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: "-".join(map(str, r.values())))
def test_snippet_reproduces_every_scheme(model, req):
    ns = run_snippet(pytorch_snippet(model, req, TEXT))
    assert same_routing(ns["result"], route_text(model, TEXT, **req))


def test_snippet_rejects_what_is_not_plain_data(model):
    with pytest.raises(ValueError, match="scheme"):
        pytorch_snippet(model, {}, TEXT)
    with pytest.raises(ValueError, match="not plain data"):
        pytorch_snippet(model, {"scheme": "softmax_topk", "extra": object()}, TEXT)
    with pytest.raises(ValueError, match="keyword argument"):
        pytorch_snippet(model, {"scheme": "softmax_topk", "x=1); import os; f(y": 1}, TEXT)


def test_snippet_for_a_lab_model_loads_the_lab_download(model):
    code = pytorch_snippet({"name": "lab-model"}, {"scheme": "softmax_topk", "top_k": 2}, TEXT)
    compile(code, "<snippet>", "exec")
    assert "load_file('lab-model')" in code and "lab's model download" in code


# ----------------------------------------------------------------------------- app panel


@pytest.fixture
def state():
    s = RouterState(text=HOSTILE[1] + " <script>alert(1)</script>")
    s.route()
    return s


def test_export_panel_downloads_what_the_app_shows(state):
    from app.views.export import ExportPanel

    panel = ExportPanel(state=state)
    panel.__panel__()
    res, m = state.result, state.model
    assert panel.json_btn.filename == f"routing-{m.name}-{state.scheme}-k{state.top_k}.json"
    assert panel._json_file().getvalue() == trace_json(res, m).encode("utf-8")
    assert panel._csv_file().getvalue() == trace_csv(res, m).encode("utf-8")
    ns = run_snippet(panel._py_file().getvalue().decode("utf-8"))
    assert same_routing(ns["result"], res)
    # the user's text is escaped in the page, never HTML
    assert "<script>" not in panel.code.object and html.escape("<script>") in panel.code.object


def test_export_panel_follows_the_request_and_keeps_the_last_good_result(state):
    from app.views.export import ExportPanel

    panel = ExportPanel(state=state)
    state.scheme = "switch"
    state.capacity_factor = 0.5
    state.route()
    assert panel.csv_btn.filename == "routing-moe-n8-switch-cf0.5.csv"
    good = panel._json_file().getvalue()
    assert json.loads(good)["scheme"] == "switch"
    state.text = ""
    state.route()                       # fails: the state keeps the last result, so do the downloads
    assert state.error and panel._json_file().getvalue() == good
    ns = run_snippet(panel.snippet())
    assert same_routing(ns["result"], state.result)


def test_export_panel_reproduces_a_routing_that_the_app_truncated():
    from app.views.export import ExportPanel

    s = RouterState(text="x " * 5000)      # more than MAX_TOKENS tokens: the app routes the first 4096
    s.route()
    assert s.result.truncated
    panel = ExportPanel(state=s)
    code = panel.snippet()
    assert "truncate=True" in code
    assert "download has all of them" in panel.code.object
    assert same_routing(run_snippet(code)["result"], s.result)


# ----------------------------------------------------------------------------- scale


TINY = {"n_values": [1, 2, 4], "top_k": 1, "d_model": 8, "d_ff": 8, "tokens": 16, "repeats": 1}


def test_measure_scale_memory_grows_with_n_and_active_stays_nearly_flat():
    r = measure_scale(**TINY)
    rows = r["rows"]
    assert [x["n_experts"] for x in rows] == [1, 2, 4]
    assert all(x["ms"] > 0 for x in rows) and r["dense"]["ms"] > 0
    mb = [x["weight_mb"] for x in rows]
    assert mb == sorted(mb) and len(set(mb)) == 3
    per_expert = 8 * 16 + 8 * 8                     # SwiGLU: w_in [8, 2*8], w_out [8, 8]
    for x in rows:
        n = x["n_experts"]
        assert x["total_params"] == n * per_expert + n * 8          # experts + router
        assert x["active_params_per_token"] == per_expert + n * 8   # one expert + the whole router
    assert r["dense"]["params"] == per_expert                       # dense FFN of the active width
    assert r["machine"]["processor"] and r["config"]["d_model"] == 8
    assert summary(r)["memory_ratio"] == pytest.approx(4.0, rel=0.01)


@pytest.mark.parametrize("bad, match", [
    ({"n_values": [4, 2]}, "increasing"),
    ({"n_values": [2, 4], "top_k": 3}, "larger than the smallest N"),
    ({"tokens": 0}, "tokens"),
])
def test_measure_scale_rejects_bad_sizes(bad, match):
    with pytest.raises(ValueError, match=match):
        measure_scale(**{**TINY, **bad})


def test_background_runner_measures_once_and_later_runners_reuse_the_cache(tmp_path):
    cache = tmp_path / "scale_cache.json"
    first = ScaleRunner(cache_path=cache, config=TINY, nice=0)
    assert first.start()["state"] in ("running", "done")
    st = first.wait(60)
    assert st["state"] == "done", st["error"]
    assert st["result"]["machine"]["torch_threads"] == 1       # measured with one thread
    assert torch.get_num_threads() >= 1
    assert read_result(cache)["rows"] == st["result"]["rows"]
    assert st["progress"] == (TINY["repeats"], TINY["repeats"])
    assert first.start()["result"] is st["result"]             # a second start does nothing
    second = ScaleRunner(cache_path=cache, config=TINY)
    st2 = second.start()
    assert st2["state"] == "done" and st2["cached"] and st2["result"]["rows"] == st["result"]["rows"]
    other = ScaleRunner(cache_path=cache, config={**TINY, "tokens": 32}, nice=0)   # other sizes: measure again
    assert other.start()["state"] == "running"
    other.wait(60)


def test_reference_measurement_is_shipped_and_labelled():
    from moe_core.perf.scale import load_reference

    ref = load_reference()
    assert ref is not None and ref["kind"] == "reference" and "2-core" in ref["label"]
    mb = [r["weight_mb"] for r in ref["rows"]]
    assert mb == sorted(mb) and ref["measured_at"]


def test_scale_view_shows_this_servers_measurement_or_says_it_is_the_reference(tmp_path):
    from app.views.scale import ScaleView

    runner = ScaleRunner(cache_path=tmp_path / "c.json", config=TINY, nice=0)
    waiting = ScaleView(runner=runner, autostart=False)
    assert "Reference measurement" in waiting.source.object
    assert waiting.mem_src.data["n"] == waiting.reference["config"]["n_values"]
    runner.start()
    runner.wait(60)
    waiting.refresh()
    assert "measured on this server" in waiting.source.object
    assert waiting.mem_src.data["n"] == [1, 2, 4]
    assert waiting.time_fig.xaxis.ticker.ticks == [1, 2, 4]
    assert len(waiting.dense_src.data["ms"]) == 2
    assert "\u00d74" in waiting.readout.object
    waiting.__panel__()


def test_source_line_is_honest_about_where_the_numbers_come_from():
    from app.views.scale import source_line
    from moe_core.perf.scale import load_reference

    ref = load_reference()
    text, shown = source_line({"state": "running", "progress": (2, 7)}, ref)
    assert shown is ref and text.startswith("Reference measurement from") and "2 of 7 timing rounds" in text
    text, shown = source_line({"state": "failed", "error": "MemoryError: x"}, ref)
    assert shown is ref and "failed: MemoryError: x" in text
    mine = {**ref, "kind": "measured"}
    text, shown = source_line({"state": "done", "result": mine, "cached": True}, ref)
    assert shown is mine and text.startswith("measured earlier on this server (cached)")
    assert "1 torch thread" in text and "d_model 128" in text
    text, shown = source_line({"state": "running", "progress": (0, 7)}, None)
    assert shown is None and "Measuring on this server" in text
