"""Page-wide browser behaviour the widgets cannot express: lesson keys, presenter type, scroll-to.

A JSComponent with no visible content:
- while a lesson is open, the Right arrow / Space / PageDown keys go to the next step and
  Left / PageUp to the previous one (counted in `next_presses` / `prev_presses`), except when
  the key is meant for something else: typing in a text field, a slider, a select, or a key the
  token view already handled (arrow keys move between tokens there);
- `presenter` enlarges the type for projectors: it sets the CSS custom properties the widgets
  (`--bokeh-font-size`) and the app's panes (`--moe-fs`) read. No CSS zoom: Bokeh plots measure
  their box unzoomed and ran off the page under it;
- `scroll_to` scrolls the element with that CSS class (searched through Panel's shadow roots)
  into view; `scroll_seq` re-triggers it for the same class.
"""
from __future__ import annotations

import param
from panel.custom import JSComponent

PRESENTER_FONT_PX = 16       # the widgets' type in presenter mode (Bokeh's default is 12 px)


class PageControl(JSComponent):
    lesson_active = param.Boolean(default=False, doc="Whether lesson keys are listened to.")
    next_presses = param.Integer(default=0, doc="Times the user asked for the next lesson step by key.")
    prev_presses = param.Integer(default=0, doc="Times the user asked for the previous lesson step by key.")
    presenter = param.Boolean(default=False, doc="Large type for projectors.")
    scroll_to = param.String(default="", doc="CSS class of the element to scroll into view.")
    scroll_seq = param.Integer(default=0, doc="Bumped to scroll again.")

    _esm = f"""
    const FONT = {PRESENTER_FONT_PX};
    function deepFind(root, cls) {{
      const hit = root.querySelector("." + cls);
      if (hit) return hit;
      for (const el of root.querySelectorAll("*")) {{
        if (el.shadowRoot) {{ const h = deepFind(el.shadowRoot, cls); if (h) return h; }}
      }}
      return null;
    }}
    export function render({{ model, el }}) {{
      el.style.display = "none";
      const onKey = (ev) => {{
        if (!model.lesson_active || ev.defaultPrevented || ev.altKey || ev.ctrlKey || ev.metaKey) return;
        const t = ev.composedPath()[0];
        if (t && t.closest) {{
          const tag = (t.tagName || "").toLowerCase();
          if (["input", "textarea", "select", "button"].includes(tag) || t.isContentEditable) return;
          if (t.closest("[role=slider], .noUi-handle, .tokview")) return;
        }}
        if (["ArrowRight", "PageDown", " "].includes(ev.key)) {{ ev.preventDefault(); model.next_presses += 1; }}
        else if (["ArrowLeft", "PageUp"].includes(ev.key)) {{ ev.preventDefault(); model.prev_presses += 1; }}
      }};
      window.addEventListener("keydown", onKey);
      const bigType = () => {{
        const st = document.documentElement.style;
        if (model.presenter) {{ st.setProperty("--bokeh-font-size", FONT + "px"); st.setProperty("--moe-fs", "18px"); }}
        else {{ st.removeProperty("--bokeh-font-size"); st.removeProperty("--moe-fs"); }}
        document.body.classList.toggle("presenter", model.presenter);
      }};
      const scroll = () => {{
        if (!model.scroll_to) return;
        setTimeout(() => {{
          const target = deepFind(document, model.scroll_to);
          if (target) target.scrollIntoView({{ behavior: "smooth", block: "center" }});
        }}, 250);
      }};
      model.on("presenter", bigType);
      model.on("scroll_seq", scroll);
      model.on("remove", () => window.removeEventListener("keydown", onKey));
      bigType();
      scroll();
    }}
    """


__all__ = ["PageControl", "PRESENTER_FONT_PX"]
