"""Take it home: the routing trace as JSON or CSV, and the request as a PyTorch snippet.

The files are made by `moe_core.analysis.export` on click (nothing is prepared for
sessions that never download). The JSON is byte for byte what
`moe-lab route --json` prints for the same text and options. Everything is
taken from the routing on screen: when a new request fails (say, an empty
text), the last good result stays on screen and the downloads describe it.
"""
from __future__ import annotations

import html
import io

import panel as pn
import param

from moe_core.analysis.export import (
    CSV_COLUMNS,
    export_filename,
    pytorch_snippet,
    to_bytes,
    trace_csv,
    trace_json,
)

from ..state import MAX_TEXT_CHARS, RouterState, catalog

SHOWN_TEXT_CHARS = 1500   # longer texts are shortened in the on-page code (the .py download has all of it)


class ExportPanel(pn.viewable.Viewer):
    """Download buttons for the current routing, and the PyTorch code that reproduces it."""

    state = param.ClassSelector(class_=RouterState)
    css = param.String(default="", doc="Stylesheet for the text panes (app.styles.CSS).")

    def __init__(self, **params):
        super().__init__(**params)
        self._routed = None     # (RouteResult, LoadedModel, routed text, request): what is on screen
        kw = {"stylesheets": [self.css]} if self.css else {}
        self.json_btn = pn.widgets.FileDownload(callback=self._json_file, filename="routing.json", embed=False,
                                                label="Routing trace (JSON)", button_type="primary",
                                                name="export_json", css_classes=["export-json"])
        self.csv_btn = pn.widgets.FileDownload(callback=self._csv_file, filename="routing.csv", embed=False,
                                               label="Routing trace (CSV)", button_type="primary",
                                               name="export_csv", css_classes=["export-csv"])
        self.py_btn = pn.widgets.FileDownload(callback=self._py_file, filename="route.py", embed=False,
                                              label="PyTorch script (.py)", button_type="default",
                                              name="export_py", css_classes=["export-py"])
        self.code = pn.pane.HTML(sizing_mode="stretch_width", name="export_code", **kw)
        self.help = pn.pane.HTML(self._help_html(), sizing_mode="stretch_width", **kw)
        self.state.param.watch(self._on_result, "result")
        if self.state.result is not None:
            self._snapshot(self.state.result)
        else:
            for btn in (self.json_btn, self.csv_btn, self.py_btn):
                btn.disabled = True
            self.code.object = "<div class='muted'>Route a text first: the code appears here.</div>"

    # -- what is on screen -------------------------------------------------------------

    def _on_result(self, event):
        if event.new is not None:
            self._snapshot(event.new)

    def _snapshot(self, result):
        """Record the model and text this result was routed with (the state may move on and fail)."""
        # state.route() sets `result` right after routing text[:MAX_TEXT_CHARS] with request(), so at
        # this moment the state still holds exactly what produced it
        self._routed = (result, self.state.model, self.state.text[:MAX_TEXT_CHARS], self.state.request().as_dict())
        name = self._routed[1].name
        req = self.request()
        for btn, ext in ((self.json_btn, "json"), (self.csv_btn, "csv")):
            btn.filename = export_filename(name, req, ext)
        self.py_btn.filename = export_filename(name, req, "py").replace("routing-", "route-", 1)
        for btn in (self.json_btn, self.csv_btn, self.py_btn):
            btn.disabled = False
        self.code.object = self._code_html()

    def request(self) -> dict:
        """The routing options of the result on screen: RouterState.request() when it was routed."""
        return dict(self._routed[3])

    def snippet(self, max_text_chars: int | None = None) -> str:
        """The PyTorch code for the routing on screen (the text cut at max_text_chars, for display)."""
        res, model, text, req = self._routed
        shipped = model.name in {m["name"] for m in catalog()}     # cached: no disk reads per routing
        return pytorch_snippet(model, req, text[:max_text_chars], shipped=shipped,
                               max_tokens=len(res.tokens) if res.truncated else None)

    # -- files (called on click) -------------------------------------------------------

    def _file(self, make) -> io.BytesIO:
        if self._routed is None:
            return io.BytesIO(b"")
        return io.BytesIO(to_bytes(make()))

    def _json_file(self) -> io.BytesIO:
        return self._file(lambda: trace_json(self._routed[0], self._routed[1]))

    def _csv_file(self) -> io.BytesIO:
        return self._file(lambda: trace_csv(self._routed[0], self._routed[1]))

    def _py_file(self) -> io.BytesIO:
        return self._file(self.snippet)

    # -- text ----------------------------------------------------------------------------

    def _code_html(self) -> str:
        text = self._routed[2]
        code = self.snippet(SHOWN_TEXT_CHARS)
        note = ""
        if len(text) > SHOWN_TEXT_CHARS:
            note = (f"<div class='muted'>The code above shows the first {SHOWN_TEXT_CHARS:,} of "
                    f"{len(text):,} characters of your text; the .py download has all of them.</div>")
        # the user's text is inside the code: escaped, never HTML
        return (f"<pre data-testid='export-snippet' style='max-height:360px; overflow:auto; background:#f6f8fa; "
                f"padding:10px; border-radius:6px; font-size:12.5px; white-space:pre; margin:0'>"
                f"{html.escape(code)}</pre>{note}")

    @staticmethod
    def _help_html() -> str:
        cols = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in CSV_COLUMNS.items())
        return ("<div class='muted'>JSON: the same file as <code>moe-lab route --json</code> for this text and "
                "these options. CSV: one row per token, layer and expert the router chose "
                "(<details style='display:inline'><summary style='display:inline; cursor:pointer'>"
                f"columns</summary><ul style='margin:4px 0 6px 0'>{cols}</ul></details>). "
                "Plots: the save button (floppy disk) in a plot's toolbar downloads it as a PNG.</div>")

    def __panel__(self):
        return pn.Column(
            pn.Row(self.json_btn, self.csv_btn, self.py_btn, sizing_mode="stretch_width"),
            self.help,
            pn.pane.HTML("<div class='label'>PyTorch: the same routing with moe_core</div>",
                         stylesheets=[self.css] if self.css else []),
            self.code,
            sizing_mode="stretch_width",
        )


__all__ = ["ExportPanel"]
