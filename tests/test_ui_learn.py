"""The Learn tab in a browser: the explainers' formulas are drawn, not left as TeX.

(A browser test lives in a test_ui* file: pytest-playwright's session keeps an event loop running once it
starts, and the serving and memory tests, which run their own loops, must come before it.)
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.ui


def test_the_learn_tab_draws_every_formula_with_katex(page, app_url):
    """The explainers' $$ blocks are drawn by KaTeX (on the page already); none is left as raw TeX."""
    page.goto(app_url + "?tab=learn")
    page.locator(".card-title", has_text="Hash of the token id").first.click()
    page.wait_for_function("() => { let n = 0; const walk = (r) => r.querySelectorAll('*').forEach(e => {"
                           " if (e.classList && e.classList.contains('katex-display')) n++;"
                           " if (e.shadowRoot) walk(e.shadowRoot); }); walk(document); return n >= 2; }")
    # the text a reader sees: every text node outside style sheets and outside KaTeX's own output
    text = page.evaluate("""() => { const out = []; const walk = (node) => {
        for (const c of node.childNodes) {
          if (c.nodeType === 3) out.push(c.textContent);
          else if (c.nodeType === 1 && !['STYLE', 'SCRIPT'].includes(c.tagName) && !c.classList.contains('katex')) walk(c);
        }
        if (node.shadowRoot) walk(node.shadowRoot);
      }; walk(document.body); return out.join(' '); }""")
    assert "Hash of the token id" in text and "$$" not in text and "\\operatorname" not in text
