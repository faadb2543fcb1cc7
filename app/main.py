"""`panel serve app/main.py`: the MoE Router Lab dashboard (this script runs once per browser session).

The model weights are loaded once per server process (moe_core.checkpoint.load
caches them) and shared read-only by every session; each session holds only
its own RouterState and views.
"""
import contextvars

import panel as pn

from app.dashboard import CSS, Dashboard
from app.gate import install as install_build_gate, skip_document_validation
from app.quiz import warm as warm_quiz
from app.state import (RELEASE_PERIOD_S, bound_route_threads, defer_full_collections, housekeeping,
                       preload_models)

pn.extension("katex", notifications=True, raw_css=[CSS])

preload_models()                  # once per process: later sessions find them cached
pn.state.as_cached("quiz-warm", warm_quiz)   # every quiz answer computed once per process, not per student
# Full garbage collections and giving freed pages back to the OS stall every session for a second or more
# with a class connected: they run in `housekeeping`, when nobody is routing (at the latest every 2 min), not
# when CPython or we happen to be allocating (issues #7, #8; see app/state.py). Once per process
# (schedule_task ignores the repeats), from an EMPTY contextvars context: the IOLoop timer copies the current
# context, and this one holds this session's document (Panel's curdoc is a ContextVar), so the first session
# would otherwise stay alive forever, re-armed every period (measured: scripts/memprobe.py showed its
# Dashboard surviving).
defer_full_collections()
bound_route_threads()             # small routings on one core each: see app/state.py
skip_document_validation()        # Bokeh's per-session document checks: run by the tests instead
contextvars.Context().run(pn.state.schedule_task, "moe-lab-release-freed-memory", housekeeping,
                          period=f"{RELEASE_PERIOD_S}s")
install_build_gate(pn.state.curdoc.session_context)   # a class arriving at once: pages built in turn (app/gate.py)
dashboard = Dashboard()
# BootstrapTemplate: every resource it needs is bundled with Panel, so the page works offline
# (FastListTemplate fetches a Google font, which fails on a classroom network without internet).
template = pn.template.BootstrapTemplate(
    title="MoE Router Lab",
    sidebar=[dashboard.sidebar()],
    main=[dashboard.main()],
    collapsed_sidebar="controls" in dashboard.page.get("hide", []),   # a lesson link can hide the controls
    busy_indicator=None,          # the busy indicator is process-global: it would ping every session
    header_background="#0b3d6e",
    sidebar_width=330,
)
# adding the template's ~25 roots one by one makes Bokeh re-index the whole document each time
# (55 % of a session's start-up in a profile): freeze, add all, re-index once
with pn.state.curdoc.models.freeze():
    template.servable()
