"""The teaching text in assets/: explainer files, their structure and math, and the example texts.

The app reads the explainers' headings and typesets their `$$` blocks in the browser
after markdown-it has turned the Markdown into HTML, so these tests check both that
every file has the agreed shape and that its LaTeX reaches the browser unchanged.
"""
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from moe_core.model.routing import SCHEMES

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EXPLAINERS = ASSETS / "explainers"
METHOD_TOPICS = [*SCHEMES, "load_balance", "z_loss", "shared_experts"]
ALL_TOPICS = ["intro", *METHOD_TOPICS]
SECTIONS = ["How it routes", "Paper", "What to look for", "Trade-offs"]
TRADE_OFF_ROWS = ["Balance", "Dropped tokens", "Compute per token", "Causality"]
EXAMPLE_KEYS = ["English prose", "Python code", "Numbers and a table", "Multilingual", "From the MoE explainer"]
ARXIV_LINK = re.compile(r"\[arXiv:(\d{4}\.\d{4,5})\]\(https://arxiv\.org/abs/(\d{4}\.\d{4,5})\)")


def read(topic: str) -> str:
    return (EXPLAINERS / f"{topic}.md").read_text(encoding="utf-8")


def math_blocks(text: str) -> list[str]:
    """Contents of the $$ ... $$ blocks, in order."""
    return [m.strip() for m in re.findall(r"\$\$(.*?)\$\$", text, flags=re.S)]


def without_math(text: str) -> str:
    return re.sub(r"\$\$.*?\$\$", "", text, flags=re.S)


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


# ----------------------------------------------------------------------------- files and structure


@pytest.mark.parametrize("topic", ALL_TOPICS)
def test_every_topic_has_a_file(topic):
    path = EXPLAINERS / f"{topic}.md"
    assert path.is_file(), f"missing explainer {path}"
    assert re.fullmatch(r"[a-z_]+", topic)  # the app only serves names like this
    assert read(topic).startswith("# ")


@pytest.mark.parametrize("topic", METHOD_TOPICS)
def test_method_file_has_title_summary_and_four_sections_in_order(topic):
    text = read(topic)
    lines = text.splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 2
    summary = lines[1].strip()
    assert summary and not summary.startswith("#"), "the line after the title is the one-sentence summary"
    assert summary.endswith("."), "the summary is one sentence"
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings == SECTIONS
    assert not re.search(r"^#{3,} ", text, flags=re.M), "no deeper headings: the app parses ## only"


@pytest.mark.parametrize("topic", METHOD_TOPICS)
def test_paper_section_cites_an_arxiv_paper(topic):
    paper = sections(read(topic))["Paper"]
    links = ARXIV_LINK.findall(paper)
    assert links, "the Paper section links its arXiv id"
    for label, url_id in links:
        assert label == url_id, f"link text arXiv:{label} points at {url_id}"
    assert re.search(r"\(\d{4}\)", paper), "the citation gives a year"


@pytest.mark.parametrize("topic", METHOD_TOPICS)
def test_trade_offs_table_has_the_four_rows(topic):
    table = sections(read(topic))["Trade-offs"]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert rows[:2] == ["| | |", "|---|---|"]
    names = [row.split("|")[1].strip() for row in rows[2:]]
    assert names == TRADE_OFF_ROWS
    for row in rows[2:]:
        assert row.count("|") == 3, f"a '|' inside a cell breaks the table: {row}"
        assert row.split("|")[2].strip(), f"empty cell: {row}"


@pytest.mark.parametrize("topic", METHOD_TOPICS)
def test_what_to_look_for_has_three_to_five_bullets(topic):
    bullets = [line for line in sections(read(topic))["What to look for"].splitlines() if line.startswith("- ")]
    assert 3 <= len(bullets) <= 5


# ----------------------------------------------------------------------------- math


@pytest.mark.parametrize("topic", ALL_TOPICS)
def test_display_math_blocks_are_balanced_and_on_their_own_lines(topic):
    text = read(topic)
    assert text.count("$$") % 2 == 0, "unbalanced $$"
    for line in text.splitlines():
        if "$$" in line:
            assert line.strip() == "$$", f"$$ must stand on its own line: {line!r}"
    assert all(math_blocks(text)), "empty $$ block"


@pytest.mark.parametrize("topic", ALL_TOPICS)
def test_no_inline_dollar_math(topic):
    # Panel's Markdown pane typesets $$...$$ but not $...$, so a lone $ would show up raw.
    assert "$" not in without_math(read(topic))


@pytest.mark.parametrize("topic", ALL_TOPICS)
def test_latex_survives_markdown(topic):
    """Nothing in a $$ block that markdown would rewrite before the browser typesets it."""
    for block in math_blocks(read(topic)):
        assert not re.search(r"\\[!-/:-@\[-`{-~]", block), f"backslash before punctuation is eaten by Markdown: {block}"
        assert not re.search(r"[})\]]_", block), f"'_' after a bracket can open Markdown emphasis: {block}"
        assert not re.search(r"[<>&*|]", block), f"use \\lt, \\gt, \\lvert instead of raw symbols: {block}"
        for line in block.splitlines():
            assert not re.match(r"\s*([-+*]\s|\d+[.)]\s|=+\s*$|#)", line), f"line would become Markdown: {line!r}"


@pytest.mark.parametrize("topic", ALL_TOPICS)
def test_markdown_it_passes_math_through_unchanged(topic):
    markdown_it = pytest.importorskip("markdown_it")
    parser = markdown_it.MarkdownIt("gfm-like").enable("table")  # as panel.pane.Markdown builds it
    text = read(topic)
    rendered = html.unescape(parser.render(text))
    assert math_blocks(rendered) == math_blocks(text)


def _katex_js() -> Path | None:
    try:
        import panel
    except ImportError:
        return None
    found = sorted(Path(panel.__file__).parent.glob("dist/bundled/katex/*/dist/katex.min.js"))
    return found[-1] if found else None


def test_every_formula_compiles_with_katex(tmp_path):
    katex, node = _katex_js(), shutil.which("node")
    if katex is None or node is None:
        pytest.skip("needs node and Panel's bundled KaTeX")
    formulas = [(topic, block) for topic in ALL_TOPICS for block in math_blocks(read(topic))]
    assert formulas
    (tmp_path / "formulas.json").write_text(json.dumps(formulas), encoding="utf-8")
    script = (
        "const katex = require(process.argv[1]);"
        "const items = JSON.parse(require('fs').readFileSync(process.argv[2], 'utf8'));"
        "let bad = 0;"
        "for (const [topic, tex] of items) {"
        "  try { katex.renderToString(tex, {displayMode: true, throwOnError: true, strict: 'error'}); }"
        "  catch (e) { bad++; console.log(topic + ': ' + e.message); }"
        "}"
        "process.exit(bad ? 1 : 0);"
    )
    run = subprocess.run([node, "-e", script, str(katex), str(tmp_path / "formulas.json")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


# ----------------------------------------------------------------------------- example texts


def examples() -> dict[str, str]:
    return json.loads((ASSETS / "examples.json").read_text(encoding="utf-8"))


def test_examples_have_the_five_keys_in_display_order():
    assert list(examples()) == EXAMPLE_KEYS


@pytest.mark.parametrize("key", EXAMPLE_KEYS)
def test_each_example_is_300_to_900_characters(key):
    text = examples()[key]
    assert isinstance(text, str)
    assert 300 <= len(text) <= 900, f"{key}: {len(text)} characters"


def test_multilingual_example_covers_the_scripts():
    text = examples()["Multilingual"]
    scripts = {
        "Cyrillic": r"[\u0400-\u04FF]",
        "Greek": r"[\u0370-\u03FF]",
        "CJK": r"[\u4E00-\u9FFF]",
        "Arabic": r"[\u0600-\u06FF]",
    }
    for name, pattern in scripts.items():
        assert re.search(pattern, text), f"no {name} characters"
    assert re.search(r"[ñé]", text) and re.search(r"[äöüß]", text), "Spanish and German accents"


def test_python_example_runs():
    code = examples()["Python code"]
    assert '"""' in code and "#" in code and "\n    " in code
    compile(code, "<example>", "exec")


def test_explainer_example_is_quoted_from_intro():
    quote = examples()["From the MoE explainer"]
    assert quote in " ".join(read("intro").split())

