"""`panel serve app/main.py`: the MoE Router Lab dashboard (this script runs once per browser session).

The model weights are loaded once per server process (moe_core.checkpoint.load
caches them) and shared read-only by every session; each session holds only
its own RouterState and views.
"""
import panel as pn

from app.dashboard import CSS, Dashboard
from app.quiz import warm as warm_quiz
from app.state import preload_models

pn.extension("katex", notifications=True, raw_css=[CSS])

preload_models()                  # once per process: later sessions find them cached
pn.state.as_cached("quiz-warm", warm_quiz)   # every quiz answer computed once per process, not per student
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
template.servable()
