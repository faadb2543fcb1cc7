"""Notifications: a message that shows for a few seconds at the bottom of the page, then goes.

A small JSComponent that is part of the page's own layout (Panel's notification area,
without a template, stayed registered after its session closed and kept the whole
session alive: measured with scripts/memprobe.py). The message is set with
`textContent`: a message may quote user text, and is never parsed as HTML.
"""
from __future__ import annotations

import param
from panel.custom import JSComponent

SHOW_MS = 6000


class Toast(JSComponent):
    message = param.String(default="", doc="The message (plain text).")
    kind = param.Selector(default="info", objects=["info", "success", "warning", "error"])
    seq = param.Integer(default=0, doc="Bumped for every message, so the same text shows again.")

    def show(self, kind: str, message: str) -> None:
        self.param.update(kind=kind, message=message, seq=self.seq + 1)

    _esm = f"""
    export function render({{ model, el }}) {{
      const box = document.createElement("div");
      box.className = "toasts";
      box.setAttribute("role", "status");
      box.setAttribute("aria-live", "polite");
      el.appendChild(box);
      model.on("seq", () => {{
        const t = document.createElement("div");
        t.className = "toast-msg " + model.kind;
        t.textContent = model.message;
        const x = document.createElement("button");
        x.textContent = "\\u2715";
        x.setAttribute("aria-label", "dismiss");
        x.addEventListener("click", () => t.remove());
        t.appendChild(x);
        box.appendChild(t);
        setTimeout(() => t.remove(), {SHOW_MS});
      }});
    }}
    """
    _stylesheets = ["""
    .toasts { position: fixed; left: 50%; bottom: 16px; transform: translateX(-50%); z-index: 2000;
              display: flex; flex-direction: column; gap: 6px; width: min(560px, 92vw); pointer-events: none; }
    .toast-msg { pointer-events: auto; display: flex; gap: 10px; align-items: flex-start; justify-content: space-between;
             padding: 10px 14px; border-radius: 8px; font: 15px/1.4 system-ui, sans-serif; color: #fff;
             background: #0b3d6e; box-shadow: 0 6px 20px rgba(0,0,0,.25); }
    .toast-msg.error { background: #a4161a; } .toast-msg.warning { background: #8a4b00; }
    .toast-msg.success { background: #1b6b36; }
    .toast-msg button { background: none; border: 0; color: inherit; font: inherit; cursor: pointer; }
    """]


__all__ = ["Toast"]
