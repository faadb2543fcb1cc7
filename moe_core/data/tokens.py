"""The corpus as token ids: tokenised once (cached on disk), sampled as training windows and fixed
held-out windows."""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from . import corpus
from .tokenizer import TOKENIZER_PATH, get_tokenizer


class TokenData:
    """Token ids of the corpus splits, sampled as random windows."""

    def __init__(self, train: np.ndarray, eval: np.ndarray, corpus_hash: str = ""):
        self.splits = {"train": torch.from_numpy(train.astype(np.int64)), "eval": torch.from_numpy(eval.astype(np.int64))}
        self.corpus_hash = corpus_hash

    def batch(self, split: str, batch_size: int, block_size: int, gen: torch.Generator):
        data = self.splits[split]
        if len(data) <= block_size + 1:
            raise ValueError(f"the {split} split has only {len(data)} tokens, fewer than one window of {block_size + 1}")
        ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen)
        x = torch.stack([data[i : i + block_size] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + block_size] for i in ix])
        return x, y

    def eval_windows(self, block_size: int, max_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed, evenly spaced held-out windows: the same for every model, so losses compare."""
        data = self.splits["eval"]
        n = min(max_windows, (len(data) - 1) // block_size)
        starts = torch.linspace(0, len(data) - block_size - 1, n).long()
        x = torch.stack([data[s : s + block_size] for s in starts])
        y = torch.stack([data[s + 1 : s + 1 + block_size] for s in starts])
        return x, y


def _cache_dir() -> Path:
    return Path(os.environ.get("MOE_LAB_CACHE", Path.home() / ".cache" / "moe-router-lab"))


@lru_cache(maxsize=1)
def load_token_data() -> TokenData:
    """Tokenise the shipped corpus once (cached on disk, keyed by corpus + tokenizer hash)."""

    man = corpus.manifest()
    tok_hash = hashlib.sha256(Path(TOKENIZER_PATH).read_bytes()).hexdigest()[:16]
    # the corpus content hash: sha256 over the uncompressed splits' own sha256 (manifest.json)
    corpus_hash = hashlib.sha256("".join(man["splits"][s]["sha256_uncompressed"] for s in ("train", "eval"))
                                 .encode()).hexdigest()
    key = hashlib.sha256(json.dumps(man, sort_keys=True).encode() + tok_hash.encode()).hexdigest()[:16]
    cache = _cache_dir() / f"ids-{key}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return TokenData(z["train"], z["eval"], corpus_hash=corpus_hash)
    tok = get_tokenizer()
    arrays = {}
    for split in ("train", "eval"):
        ids: list[int] = []
        for doc in corpus.load_documents(split):
            ids.extend(tok.encode(doc["text"]))
            ids.append(tok.eot_id)
        arrays[split] = np.asarray(ids, dtype=np.uint16)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, cache)
    return TokenData(arrays["train"], arrays["eval"], corpus_hash=corpus_hash)
