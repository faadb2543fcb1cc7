"""Byte-level BPE tokenizer (4096 entries) for the MoE Router Lab corpus.

The vocabulary is trained with the `tokenizers` library on the train split of
assets/corpus (`moe-lab corpus` retrains it). Choices, and why:

- byte-level: every string, in any script, encodes without an unknown token and
  decodes back exactly; there is no normalizer, so `decode(encode(s)) == s`.
- digits one per token: numbers then look alike to the router ("1984" is
  1, 9, 8, 4), which makes a "digit expert" easy to see in the lab.
- `<|endoftext|>` has id 0 and separates documents; user text that happens to
  contain that string is encoded as ordinary text, never as the separator.

`tokenize(text)` returns spans into the caller's string (Python `str` indices,
i.e. code points) that partition it exactly. A byte-level token can hold part
of one character (an emoji is 4 UTF-8 bytes, a CJK character 3); such a
character belongs to the token holding its *first* byte, and a token made only
of the rest of a character gets an empty span (start == end). The spans are
computed from the tokens' own bytes, not from the library's offsets (which
report overlapping spans in that case).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

TOKENIZER_PATH = Path(__file__).resolve().parents[2] / "assets" / "tokenizer.json"
EOT = "<|endoftext|>"
VOCAB_SIZE = 4096

_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Token:
    """One token of a text: its id and the slice `text[start:end]` it covers."""

    id: int
    text: str
    start: int
    end: int


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    m = _SURROGATE.search(text)
    if m:
        raise ValueError(f"text contains an unpaired surrogate (U+{ord(m.group()):04X}) at position {m.start()}; "
                         "it cannot be encoded as UTF-8 (decode the source bytes with errors='replace' first)")


class Tokenizer:
    """A trained byte-level BPE vocabulary: encode, decode, and tokens with exact spans."""

    def __init__(self, tk):
        self._tk = tk
        self._tk.encode_special_tokens = True  # "<|endoftext|>" typed by a user is just text
        self.eot_id = tk.token_to_id(EOT)
        if self.eot_id is None:
            raise ValueError(f"the tokenizer has no {EOT} token")
        dec = _byte_decoder()
        self._bytes = [b""] * tk.get_vocab_size()
        for piece, i in tk.get_vocab().items():
            self._bytes[i] = EOT.encode() if i == self.eot_id else bytes(dec[c] for c in piece)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Tokenizer":

        path = Path(path) if path is not None else TOKENIZER_PATH
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found at {path}; build it with: moe-lab corpus")
        return cls(HFTokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    def encode(self, text: str) -> list[int]:
        _check_text(text)
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (the library encodes them in parallel)."""
        for t in texts:
            _check_text(t)
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def token_bytes(self, id: int) -> bytes:
        return self._bytes[id]

    def decode(self, ids: Iterable[int]) -> str:
        """Join the tokens' bytes; an incomplete UTF-8 sequence becomes U+FFFD."""
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_str(self, id: int) -> str:
        """A vocabulary entry as readable text; bytes of a partial character show as \\xNN."""
        return self._bytes[id].decode("utf-8", errors="backslashreplace")

    def tokenize(self, text: str) -> list[Token]:
        """Encode `text` and give each token its span; the spans partition `text` (see module doc)."""
        ids = self.encode(text)
        raw = text.encode("utf-8")
        # char_at[b] = index of the character that byte b belongs to; starts[b] = b begins a character
        char_at = []
        for i, ch in enumerate(text):
            char_at.extend([i] * len(ch.encode("utf-8")))
        char_at.append(len(text))

        def first_char_from(b: int) -> int:
            """Index of the first character whose first byte is at or after byte b."""
            if b >= len(raw) or (raw[b] & 0xC0) != 0x80:
                return char_at[b]
            return char_at[b] + 1

        tokens, b, start = [], 0, 0
        for i in ids:
            b += len(self._bytes[i])
            end = first_char_from(b)
            tokens.append(Token(i, text[start:end], start, end))
            start = end
        if b != len(raw) or start != len(text):
            raise AssertionError("tokens do not cover the text: the tokenizer must have no normalizer")
        return tokens


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The shipped tokenizer (assets/tokenizer.json), loaded once."""
    return Tokenizer.load()


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE, path: str | Path = TOKENIZER_PATH) -> Tokenizer:
    """Train the byte-level BPE on `texts` and save it to `path`. Same texts -> same file."""

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tk.save(str(tmp), pretty=True)
    tmp.replace(path)
    if path == TOKENIZER_PATH:
        get_tokenizer.cache_clear()
    return Tokenizer.load(path)
