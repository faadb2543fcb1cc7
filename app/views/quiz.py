"""The Quiz tab: predict, check against the live model, see why, then look at it in the router.

`QuizView(quiz=QuizState(), state=router_state, on_show=callback)`. All the
logic (questions, live answers, scoring, validation) lives in `app.quiz`; this
view only draws it. Bad input never raises into Panel: the message goes to a
notification and to an inline alert that screen readers announce.
"""
from __future__ import annotations

import html

import panel as pn
import param

from ..quiz import Feedback, QuizState, apply_setup, describe_setup
from ..state import RouterState
from ..styles import QUIZ_CSS

esc = html.escape
STYLES = [QUIZ_CSS]
TEXT_PREVIEW_CHARS = 600


def _html(*args, **kw):
    """An HTML pane styled by assets/page.css, app.css and quiz.css (panes live in shadow roots)."""
    return pn.pane.HTML(*args, stylesheets=STYLES, **kw)


def feedback_html(fb: Feedback | None) -> str:
    """The feedback card: verdict, both answers, the explanation with the model's real numbers."""
    if fb is None:
        return ""
    verdict, cls = ("\u2713 Correct", "correct") if fb.correct else ("\u2717 Not this time", "incorrect")
    return (f"<div class='quiz-feedback {cls}' role='status' aria-live='polite' data-testid='quiz-feedback'>"
            f"<div class='verdict'>{verdict}</div>"
            f"<div class='answers'><span>Your prediction: <b>{esc(fb.given)}</b></span>"
            f"<span>The model: <b data-testid='quiz-answer'>{esc(fb.answer)}</b></span></div>"
            f"<p>{esc(fb.explanation)}</p><p><b>The idea:</b> {esc(fb.lesson)}</p>"
            f"<div class='muted'>{esc(fb.source)} Setup: {esc(describe_setup(fb.setup))}.</div></div>")


def setup_html(setup: dict) -> str:
    text = setup["text"]
    shown = text if len(text) <= TEXT_PREVIEW_CHARS else text[:TEXT_PREVIEW_CHARS] + "\u2026"
    return (f"<div class='quiz-setup'><span class='label'>Setup</span> {esc(describe_setup(setup))}"
            f"<details><summary>The text it routes ({len(text):,} characters)</summary>"
            f"<pre class='quiz-text'>{esc(shown)}</pre></details></div>")


class QuizView(pn.viewable.Viewer):
    """One question at a time: prediction widget, Check, feedback card, score, navigation."""

    quiz = param.ClassSelector(class_=QuizState, doc="The questions, answers and score.")
    state = param.ClassSelector(class_=RouterState, default=None, allow_None=True,
                                doc="The router state 'Show me in the router' applies a setup to (if no on_show).")
    on_show = param.Callable(default=None, allow_None=True,
                             doc="Called with a question's setup dict; the page applies it and switches tab.")
    notify = param.Callable(default=None, allow_None=True, doc="notify(kind, message): shows a message to the user.")

    def __init__(self, **params):
        if params.get("quiz") is None:
            params["quiz"] = QuizState()
        super().__init__(**params)
        self.last_error = ""
        self.header = _html(sizing_mode="stretch_width")
        self.prompt = _html(sizing_mode="stretch_width")
        self.setup = _html(sizing_mode="stretch_width")
        self.choices = pn.widgets.RadioBoxGroup(options=["-"], inline=False, name="Your prediction",
                                                sizing_mode="stretch_width", css_classes=["quiz-choices"],
                                                stylesheets=[".bk-input-group label { font-size: 15px; }"])
        self.number = pn.widgets.TextInput(name="Your prediction (a number)", placeholder="e.g. 1,400,000",
                                           width=260)
        self.check_btn = pn.widgets.Button(name="Check", button_type="primary", width=110)
        self.prev_btn = pn.widgets.Button(name="\u2190 Previous", width=110)
        self.next_btn = pn.widgets.Button(name="Next question \u2192", width=150)
        self.show_btn = pn.widgets.Button(name="Show me in the router", width=190)
        self.reset_btn = pn.widgets.Button(name="Start again", button_type="light", width=110)
        self.error = _html(sizing_mode="stretch_width")
        self.feedback = _html(sizing_mode="stretch_width")

        self.check_btn.on_click(self._on_check)
        self.next_btn.on_click(lambda e: self._navigate(self.quiz.next))
        self.prev_btn.on_click(lambda e: self._navigate(self.quiz.previous))
        self.show_btn.on_click(self._on_show)
        self.reset_btn.on_click(lambda e: self._navigate(self.quiz.reset))
        self.number.param.watch(self._on_enter, "enter_pressed")
        self.quiz.param.watch(self._render_question, ["index"])
        self.quiz.param.watch(self._render_feedback, ["feedback", "score", "answered"])
        self._layout = pn.Column(
            self.header, self.prompt, self.setup, self.choices, self.number,
            pn.Row(self.check_btn, self.show_btn),
            self.error, self.feedback,
            pn.Row(self.prev_btn, self.next_btn, self.reset_btn),
            sizing_mode="stretch_width", css_classes=["quiz"], max_width=980,
        )
        self._render_question()

    # -- drawing -------------------------------------------------------------------

    def _header_html(self) -> str:
        q, n = self.quiz, len(self.quiz.questions)
        done = f" \u2014 all {n} answered" if q.finished else ""
        return (f"<div class='quiz-head'><span class='quiz-count'>Question {q.index + 1} of {n}: "
                f"{esc(q.current.title)}</span><span class='quiz-score' data-testid='quiz-score' aria-live='polite'>"
                f"Score {q.score_text()}{done}</span></div>")

    def _render_question(self, *events):
        q = self.quiz.current
        self._set_error("")
        try:
            prompt = self.quiz.prompt()
        except ValueError as e:       # e.g. a checkpoint could not be read
            prompt = "This question cannot be computed right now."
            self._set_error(str(e))
        with pn.io.hold():
            self.prompt.object = f"<div class='quiz-prompt'><p>{esc(prompt)}</p></div>"
            self.setup.object = setup_html(q.setup)
            is_choice = q.kind == "choice"
            self.choices.visible, self.number.visible = is_choice, not is_choice
            if is_choice:
                self.choices.param.update(options=list(q.options), value=None)
            else:
                self.number.param.update(value="", value_input="",
                                         name=f"Your prediction (a number; {q.tolerance_text()})")
            self.prev_btn.disabled = self.quiz.index == 0
            self.next_btn.disabled = self.quiz.index == len(self.quiz.questions) - 1
            self._render_feedback()

    def _render_feedback(self, *events):
        fb = self.quiz.feedback
        with pn.io.hold():
            self.header.object = self._header_html()
            self.feedback.object = feedback_html(fb)
            self.show_btn.disabled = fb is None   # predict first, then reveal

    def _set_error(self, message: str):
        self.last_error = message
        self.error.object = (f"<div class='quiz-error' role='alert'>{esc(message)}</div>" if message else "")
        if message and self.notify is not None:
            self.notify("error", message)

    # -- actions -------------------------------------------------------------------

    def answer_value(self):
        """What the student entered for the current question (None when nothing yet)."""
        if self.quiz.current.kind == "choice":
            return self.choices.value
        return self.number.value_input or self.number.value

    def check(self, answer=None) -> Feedback | None:
        """Check `answer` (default: the widgets' value); bad input shows a message instead of raising."""
        answer = self.answer_value() if answer is None else answer
        try:
            fb = self.quiz.check(answer)
        except ValueError as e:
            msg = str(e)
            self._set_error(msg[:1].upper() + msg[1:])
            return None
        self._set_error("")
        return fb

    def _on_check(self, event):
        self.check()

    def _on_enter(self, event):
        self.check()

    def _navigate(self, action):
        try:
            action()
        except ValueError as e:
            self._set_error(str(e))

    def _on_show(self, event):
        self.show_in_router()

    def show_in_router(self) -> dict:
        """Hand the current question's setup to the page (or apply it to the router state)."""
        setup = dict(self.quiz.current.setup)
        try:
            if self.on_show is not None:
                self.on_show(setup)
            elif self.state is not None:
                apply_setup(self.state, setup)
            else:
                self._set_error("There is no router on this page to show it in.")
        except ValueError as e:
            self._set_error(str(e))
        return setup

    def __panel__(self):
        return self._layout


__all__ = ["QuizView", "feedback_html", "setup_html"]
