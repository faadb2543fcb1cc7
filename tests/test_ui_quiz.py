"""Browser test of the Quiz tab: predict, check against the live model, see feedback and a score.

Needs app/dashboard.py to add `QuizView` (app/views/quiz.py) as a tab named "Quiz".
"""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.test_ui import IGNORED, open_app

pytestmark = pytest.mark.ui


def test_quiz_tab_checks_a_prediction_against_the_live_model(page: Page, app_url):
    from app.quiz import QuizState

    errors = open_app(page, app_url)
    page.get_by_text("Quiz", exact=True).first.click()
    expect(page.get_by_text("Who takes the digits?").first).to_be_visible(timeout=30_000)
    expect(page.get_by_text(re.compile(r"Score 0 / 0")).first).to_be_visible(timeout=30_000)

    quiz = QuizState()                        # the same question, answered by the same checkpoint here
    right = quiz.current.options[quiz.live().answer]
    wrong = next(o for o in quiz.current.options if o != right)

    page.get_by_role("button", name="Check", exact=True).click()        # nothing chosen: a message, no score
    expect(page.locator(".quiz-error").first).to_contain_text("Choose one of the options", timeout=30_000)

    page.get_by_label(wrong, exact=True).check()
    page.get_by_role("button", name="Check", exact=True).click()
    feedback = page.locator("[data-testid=quiz-feedback]").first
    expect(feedback).to_contain_text("Not this time", timeout=30_000)
    expect(page.locator("[data-testid=quiz-answer]").first).to_have_text(right, timeout=30_000)
    expect(page.locator("[data-testid=quiz-score]").first).to_contain_text("Score 0 / 1", timeout=30_000)

    page.get_by_label(right, exact=True).check()
    page.get_by_role("button", name="Check", exact=True).click()
    expect(feedback).to_contain_text("Correct", timeout=30_000)
    expect(page.locator("[data-testid=quiz-score]").first).to_contain_text("Score 1 / 1", timeout=30_000)
    assert [e for e in errors if not any(i in e for i in IGNORED)] == []
