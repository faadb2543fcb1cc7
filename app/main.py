"""`panel serve app/main.py`: the MoE Router Lab dashboard (this script runs once per browser session).

The model weights are loaded once per server process (moe_core.model.checkpoint.load
caches them) and shared read-only by every session; each session holds only
its own RouterState and the few views it has opened.
"""
import panel as pn

from app.dashboard import Dashboard
from app.quiz import warm as warm_quiz
from app.state import bound_route_threads, preload_models
from app.styles import PAGE_CSS

# no template: every resource the page needs is bundled with Panel (the page works offline), and the
# document holds only the header, the controls and the first screen
pn.extension("katex", raw_css=[PAGE_CSS])     # katex: the explainers' formulas

preload_models()                  # once per process: later sessions find them cached
pn.state.as_cached("quiz-warm", warm_quiz)   # every quiz answer computed once per process, not per student
bound_route_threads()             # small routings on one core each: see app/state.py
Dashboard().page_layout().servable(title="MoE Router Lab")
