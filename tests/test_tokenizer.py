"""The shipped byte-level BPE tokenizer: exact round trips, spans that partition the text, digits."""
import json
import random
from dataclasses import FrozenInstanceError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_core.data.corpus import KINDS, load_documents
from moe_core.data.tokenizer import EOT, TOKENIZER_PATH, Token, Tokenizer, get_tokenizer, train_tokenizer

HOSTILE = [
    "", " ", "   ", "\t\t", "\n", "\n\n\n", "\r\n", "a\r\nb\rc\n", " \t \n\r\n ",
    "\x00", "a\x00b", "\x1b[31mred\x1b[0m", "\x7f\x01\x02",
    "😀", "a😀b", "😀😀😀", "👩‍👩‍👧‍👦", "👍🏽", "🏳️‍🌈", "🇸🇪🇯🇵", "🦩🦕🧬",
    "e\u0301", "n\u0303o\u0308", "Z̷̢͍a̴l̸g̵o̶", "\ufeffBOM", "\u200b\u200c\u200d", "\xa0\u2028\u2029",
    "日本語のテキスト", "中文，标点。", "한국어", "𠀀𠀁𪚥",  # astral-plane CJK
    "مرحبا بالعالم", "שָׁלוֹם", "abc \u202eevil\u202c def", "\u200fRTL\u200e",
    "Привет, мир!", "Γειά σου", "नमस्ते", "ภาษาไทย", "ሰላም",
    "def f(x):\n\treturn x ** 2  # sq\n", "    \n        pass\n",
    "1234567890", "3.14159", "-0.5e-10", "١٢٣ ۴۵۶ १२३", "½ ² ⅷ",
    "<|endoftext|>", "a<|endoftext|>b", "<|endoftext|><|endoftext|>",
    "a" * 5000, " " * 3000, "\n" * 1000, "😀" * 500, "ab" * 2000, "9" * 1000,
    "\U0010ffff\U000e0001", "\ufffd\ufffe",
]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def check_partition(tok, text):
    toks = tok.tokenize(text)
    assert "".join(t.text for t in toks) == text
    pos = 0
    for t in toks:
        assert t.start == pos and t.end >= t.start and text[t.start:t.end] == t.text
        pos = t.end
    assert pos == len(text)
    assert [t.id for t in toks] == tok.encode(text)
    return toks


def test_vocabulary_size_and_separator(tok):
    assert tok.vocab_size == 4096
    assert tok.eot_id == 0 and tok.token_str(0) == EOT
    cfg = json.loads(TOKENIZER_PATH.read_text(encoding="utf-8"))
    assert cfg["normalizer"] is None
    assert cfg["model"]["type"] == "BPE"
    assert [p["type"] for p in cfg["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_strings_round_trip_and_partition(tok, text):
    assert tok.decode(tok.encode(text)) == text
    check_partition(tok, text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_round_trips_and_partitions(text):
    tok = get_tokenizer()
    assert tok.decode(tok.encode(text)) == text
    check_partition(tok, text)


def test_eval_sample_round_trips_and_partitions(tok):
    docs = load_documents("eval")
    rng = random.Random(0)
    sample = [rng.choice([d for d in docs if d["kind"] == k]) for k in KINDS for _ in range(5)]
    for d in sample:
        assert tok.decode(tok.encode(d["text"])) == d["text"]
        check_partition(tok, d["text"])


def test_a_split_character_goes_to_its_first_token(tok):
    toks = check_partition(tok, "x🦩y")  # a rare emoji: 4 UTF-8 bytes, several byte-level tokens
    assert len(toks) > 3
    assert toks[0].text == "x" and toks[-1].text == "y"
    assert (toks[1].text, toks[1].start, toks[1].end) == ("🦩", 1, 2)
    assert all(t.start == t.end == 2 and t.text == "" for t in toks[2:-1])


def test_separator_text_in_user_input_is_not_the_separator(tok):
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eot_id not in ids
    assert tok.decode([tok.eot_id]) == EOT


def test_digits_are_one_per_token(tok):
    assert [t.text for t in tok.tokenize("2024")] == ["2", "0", "2", "4"]
    assert [t.text for t in tok.tokenize("x = 3.25")][-4:] == ["3", ".", "2", "5"]
    for i in range(tok.vocab_size):
        s = tok.token_bytes(i).decode("utf-8", errors="replace")
        if any(c.isdigit() for c in s):
            assert len(s) == 1, (i, s)


def test_unpaired_surrogates_and_non_strings_are_refused(tok):
    with pytest.raises(ValueError, match=r"unpaired surrogate \(U\+D800\) at position 3"):
        tok.encode("abc\ud800def")
    with pytest.raises(ValueError, match="U\\+DE00"):
        tok.tokenize("\ude00")
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError):
        tok.tokenize(None)


def test_decode_of_a_partial_character_does_not_raise(tok):
    ids = tok.encode("🦩")
    assert tok.decode(ids[:1]) == "\ufffd" or len(ids) == 1


def test_token_str_escapes_partial_utf8(tok):
    partial = [i for i in range(tok.vocab_size) if "\\x" in tok.token_str(i)]
    assert partial, "a byte-level vocabulary has entries that are parts of characters"
    assert tok.token_str(tok.encode(" the")[0]) == " the"


def test_token_is_a_frozen_span():
    t = Token(5, "ab", 0, 2)
    with pytest.raises(FrozenInstanceError):
        t.id = 6


def test_get_tokenizer_is_cached():
    assert get_tokenizer() is get_tokenizer()


def test_load_missing_file_says_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="moe-lab corpus"):
        Tokenizer.load(tmp_path / "nope.json")


def test_training_is_deterministic(tmp_path):
    texts = ["def f(x):\n    return x + 1\n", "To be, or not to be: 1599.", "Привет мир 😀", "año 2024"] * 20
    a = train_tokenizer(texts, vocab_size=300, path=tmp_path / "a.json")
    train_tokenizer(texts, vocab_size=300, path=tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a.eot_id == 0 and a.vocab_size <= 300
    assert a.decode(a.encode("Привет 2024 😀")) == "Привет 2024 😀"
