"""Values from the browser are untrusted: a control refuses one it could not have sent.

A widget's value arrives over the websocket, so anyone can send anything: k = 999, a scheme that does
not exist, a number where text goes, the button index -1 (Python would pick the last model). Panel
would try to apply it, fail inside a watcher and log a server traceback. `refuse_bad_values` checks a
message first, with the same checks the value would meet (the widget's own parameter, and the
RouterState parameter it is bound to: its bounds and objects, and a slider's own range), and refuses a bad one: nothing changes,
the control shows the current value again, and the student is told.
"""
from __future__ import annotations

from typing import Callable

import param


def refuse_bad_values(widget, say: Callable[[str], None], bound: param.Parameter | None = None):
    """Check every message from the browser to `widget` before Panel applies it; `bound` is the state
    parameter its value is bound to (Widget.from_param), if any. Returns the widget."""
    process = widget._process_events           # Panel's handler of browser messages for this widget

    def checked(events: dict) -> None:
        try:
            if "active" in events:             # a button group's index: Python would read -1 as the last
                active = events["active"]
                indices = active if isinstance(active, list) else [active]
                if not all(isinstance(i, int) and 0 <= i < len(widget.labels) for i in indices):
                    raise ValueError(active)
            for name, value in widget._process_property_change(dict(events)).items():
                if name in widget.param:
                    widget.param[name]._validate(value)             # type, bounds, objects
                if name in ("value", "value_throttled"):
                    if bound is not None:
                        bound._validate(value)
                    lo, hi = getattr(widget, "start", None), getattr(widget, "end", None)   # a slider's range
                    if lo is not None and hi is not None and value is not None and not lo <= value <= hi:
                        raise ValueError(value)
        except Exception:
            say(f"{widget.name or 'A control'}: the page sent a value this control does not offer; "
                f"it was not applied.")
            if "value" in widget.param:
                widget.param.trigger("value")  # the browser shows the current value again
            return
        process(events)

    widget._process_events = checked
    return widget
