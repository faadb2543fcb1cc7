"""Token categories: the one surface taxonomy of token text, fine and coarse.

Experts in MoE language models specialise in surface, syntactic patterns that
the router learns (digits, whitespace and indentation, punctuation, word
pieces, code keywords, a writing system), not in human subjects: there is no
"maths expert" or "biology expert" (Mixtral of Experts, Jiang et al. 2024,
arXiv:2401.04088, section 5; OLMoE, Muennighoff et al. 2024,
arXiv:2409.02060, section 5). These categories let a student check that on
our own models. They are ours: a small, deterministic classification of a
token's text made to explain routing, not a linguistic analysis and not
anything the model was told.

One classifier, `token_category`, two levels:

- fine, CATEGORIES (24 classes): the expert profiles
  (moe_core.analysis.profiles and the Profiles tab), where the detail shows an
  expert that takes indentation, brackets or one writing system.
- coarse, COARSE_CATEGORIES (6 classes: digit, punctuation, whitespace,
  capitalised word, Python keyword, other), each a union of fine classes
  (COARSE): the specialisation NMI of the model cards
  (moe_core.analysis.specialisation) and the quiz, where few classes read better.

Changing COARSE changes what the cards' `nmi_category` means (retrain or
recompute them); changing CATEGORIES makes the cached profiles stale
(`python -m moe_core.analysis.profiles --all`).
"""
from __future__ import annotations

import keyword
import unicodedata

CATEGORIES = (
    "digit", "newline", "newline+indent", "indentation", "space",
    "punctuation", "bracket/operator", "code keyword", "English keyword",
    "capitalised word", "word start", "word piece", "identifier/mixed",
    "CJK", "Cyrillic", "Greek", "Arabic", "Hebrew", "Devanagari", "other Indic",
    "Southeast Asian", "other script", "byte fragment", "end of text",
)
COARSE_CATEGORIES = ("digit", "punctuation", "whitespace", "capitalised", "keyword", "other")
COARSE = {c: "other" for c in CATEGORIES} | {
    "digit": "digit", "punctuation": "punctuation", "bracket/operator": "punctuation",
    "newline": "whitespace", "newline+indent": "whitespace", "indentation": "whitespace", "space": "whitespace",
    "capitalised word": "capitalised", "code keyword": "keyword", "English keyword": "keyword",
}
BRACKETS_OPERATORS = set("()[]{}<>=+-*/%&|^~@!:.,;")  # characters of code structure
# Python keywords that are also everyday English words: " and" in a sentence is English, and
# calling it a code keyword would invent a "code expert"
ENGLISH_KEYWORDS = {"and", "as", "else", "for", "from", "if", "in", "is", "not", "or", "while", "with"}
_SCRIPTS = {  # first word of the Unicode character name -> category
    "CJK": "CJK", "HIRAGANA": "CJK", "KATAKANA": "CJK", "HANGUL": "CJK", "IDEOGRAPHIC": "CJK",
    "CYRILLIC": "Cyrillic", "GREEK": "Greek", "ARABIC": "Arabic", "HEBREW": "Hebrew", "DEVANAGARI": "Devanagari",
    "BENGALI": "other Indic", "TAMIL": "other Indic", "TELUGU": "other Indic", "GUJARATI": "other Indic",
    "GURMUKHI": "other Indic", "KANNADA": "other Indic", "MALAYALAM": "other Indic", "SINHALA": "other Indic",
    "TIBETAN": "other Indic",
    "THAI": "Southeast Asian", "LAO": "Southeast Asian", "KHMER": "Southeast Asian", "MYANMAR": "Southeast Asian",
}


def token_category(text: str) -> str:
    """The fine category of one token's text, one of CATEGORIES. The rules, in order:

    - "end of text": the document separator <|endoftext|>.
    - "byte fragment": the token holds only part of a multi-byte UTF-8
      character (U+FFFD after decoding with errors="replace"), e.g. half of
      a CJK character; nothing else about it is visible.
    - whitespace only: "newline" (only line breaks), "newline+indent" (a line
      break followed by spaces/tabs: the start of an indented line of code),
      "indentation" (two or more spaces/tabs), "space" (one space or other).
    - after stripping surrounding spaces: "digit" (the tokenizer splits
      numbers into single digits), "bracket/operator" (only characters of
      BRACKETS_OPERATORS, such as `(`, `==`, `):`), "punctuation" (only other
      Unicode punctuation/symbols: quotes, #, ...), "code keyword" (a Python
      keyword such as def, return, None) or "English keyword" (a Python keyword
      that is also an everyday English word, ENGLISH_KEYWORDS: "and", "in", "for").
    - letters: the writing system of the first letter decides. Non-Latin
      scripts get their block's category (CJK includes kana and Hangul; "other
      Indic" the other Brahmic scripts). Latin letters: "capitalised word"
      (starts with a capital), "word start" (lowercase, preceded by a space:
      the beginning of a word) or "word piece" (lowercase, no space: the
      middle or end of a word split by the tokenizer).
    - anything else, e.g. `_init`, `x1`, `self.`: "identifier/mixed".
    """
    if text == "<|endoftext|>":
        return "end of text"
    if not text or ("\ufffd" in text and not any(c.isalpha() for c in text.replace("\ufffd", ""))):
        return "byte fragment"
    s = text.strip()
    if not s:
        if set(text) <= {"\n", "\r"}:
            return "newline"
        if "\n" in text:
            return "newline+indent"
        return "indentation" if len(text) >= 2 else "space"
    if s.isdigit() and s.isascii():
        return "digit"
    if all(c in BRACKETS_OPERATORS for c in s):
        return "bracket/operator"
    if all(unicodedata.category(c)[0] in "PS" for c in s):
        return "punctuation"
    if keyword.iskeyword(s):
        return "English keyword" if s in ENGLISH_KEYWORDS else "code keyword"
    first = next((c for c in s if c.isalpha() or unicodedata.category(c)[0] == "M"), None)
    if first is not None:
        name = unicodedata.name(first, "")
        if not name.startswith("LATIN"):
            return _SCRIPTS.get(name.split(" ")[0], "other script")
        if s.isalpha():
            if s[0].isupper():
                return "capitalised word"
            return "word start" if text[0] == " " else "word piece"
    return "identifier/mixed"


def coarse_category(text: str) -> str:
    """The coarse category of one token's text, one of COARSE_CATEGORIES: COARSE[token_category(text)]."""
    return COARSE[token_category(text)]
