"""TextTokenizer.encode (truncation inside one Rust batch call) gives exactly what the Hugging Face
call ``tokenizer(texts, truncation=True, max_length=n)`` gives, and counts what it cut, for the
tokenizers of every family, both truncation sides, with and without special tokens."""

from __future__ import annotations

import gzip
import itertools
import json
import random

import pytest

from bgekit import InputError
from bgekit.models.tokenization import TextTokenizer, load_hf_tokenizer

from .conftest import require_shared

TEXTS = [
    "",
    "a",
    "what do pandas eat?",
    "The giant panda is a bear native to China that eats bamboo. " * 6,
    "héllo wörld ñ, 日本語のテキスト, emoji 🙂 and Ελληνικά " * 3,
]


@pytest.mark.parametrize("folder", ["bert-cls", "xlmr-m3", "mistral-llm", "gemma-llm-reranker"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("special", [True, False])
def test_encode_matches_the_hf_call(golden_dir, folder, side, special):
    hf = load_hf_tokenizer(golden_dir / "models" / folder)
    hf.truncation_side = side
    tokenizer = TextTokenizer(hf)
    full = [len(ids) for ids in hf(TEXTS, add_special_tokens=special)["input_ids"]]
    for max_length in (4, 16, 512):
        got = tokenizer.encode(TEXTS, max_length, add_special_tokens=special)
        want = hf(TEXTS, truncation=True, max_length=max_length, add_special_tokens=special)
        assert got.ids == want["input_ids"], (folder, side, max_length)
        if tokenizer.uses_type_ids:  # None stands for all zeros (collate and packing fill them in)
            types = got.type_ids or [[0] * len(row) for row in got.ids]
            assert types == want["token_type_ids"]
            assert (got.type_ids is None) == all(t == 0 for row in want["token_type_ids"] for t in row)
            collated = tokenizer.collate(got.ids, got.type_ids)["token_type_ids"]  # padded on the right
            width = collated.shape[1]
            assert collated.tolist() == [row + [0] * (width - len(row)) for row in want["token_type_ids"]]
        assert got.truncated == sum(n > max_length for n in full)


def test_side_change_after_first_use_is_honoured(golden_dir):
    tokenizer = TextTokenizer(load_hf_tokenizer(golden_dir / "models" / "bert-cls"))
    right = tokenizer.encode(TEXTS[3:4], 6).ids[0]
    tokenizer.truncation_side = "left"
    left = tokenizer.encode(TEXTS[3:4], 6).ids[0]
    assert right[1:-1] != left[1:-1] and right[0] == left[0] and right[-1] == left[-1]


def test_max_length_without_room_for_text_is_an_input_error(golden_dir):
    tokenizer = TextTokenizer(load_hf_tokenizer(golden_dir / "models" / "bert-cls"))
    with pytest.raises(InputError, match="max_length=2"):
        tokenizer.encode(["hello"], 2)


@pytest.mark.parametrize("folder", ["bert-cls", "xlmr-reranker", "mistral-llm", "gemma-llm-reranker"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_pairs_fast_path_equals_pair_by_pair_processing(golden_dir, folder, side):
    """Pairs are cut in the Rust batch calls and joined by the post-processor's learned layout;
    the result must be what processing each pair on its own gives (FlagEmbedding's cut rules)."""
    hf = load_hf_tokenizer(golden_dir / "models" / folder)
    hf.truncation_side = side
    tokenizer = TextTokenizer(hf)
    assert tokenizer._pair_template() is not None, "the common post-processors have a fixed pair layout"
    firsts = [t for t in TEXTS if t] + ["a query that is long enough to be cut " * 4]
    seconds = [*reversed(TEXTS), "short"]
    firsts, seconds = firsts[: len(seconds)], seconds[: len(firsts)]
    for first_max, max_length in ((4, 12), (8, 16), (64, 512), (30, 40)):
        got = tokenizer.encode_pairs(firsts, seconds, first_max, max_length)
        want = tokenizer._encode_pairs_one_by_one(
            firsts, seconds, min(first_max, max_length - tokenizer.n_special_pair - 1), max_length
        )
        assert got.ids == want.ids, (folder, side, first_max, max_length)
        assert got.type_ids == want.type_ids and got.truncated == want.truncated
        assert max(map(len, got.ids)) <= max_length


# -- the plain-ASCII shortcut of BERT's normalizer ---------------------------------------------------


def _mixed_texts(seed: int = 0) -> list[str]:
    """ASCII texts with every ASCII character (controls included), special-token strings and
    whitespace runs, plus real sentences, documents and the non-ASCII texts above."""
    rng = random.Random(seed)
    pieces = [chr(c) for c in range(128)] + ["[MASK]", "[SEP]", "[CLS]", "  ", "\t", "\r\n", "Hello", "don't"]
    pieces += ["U.S.A.", "3.14", "e-mail", "x" * 120, "unaffable", "WORLD"]
    rows = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    rows += ["".join(rng.choice(pieces[32:127]) for _ in range(rng.randint(1, 40))) for _ in range(100)]
    rows += [f"un{chr(c)}affable WORLD{chr(c)}x" for c in range(128)]  # each character alone in a text
    stsb = require_shared("data", "stsbenchmark", "test.tsv").read_text(encoding="utf-8").splitlines()[1:200]
    rows += [text for line in stsb for text in line.split("\t")[:2]]
    with gzip.open(require_shared("data", "scifact", "corpus.jsonl.gz"), "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in itertools.islice(f, 300)]
    rows += [f"{d['title']}. {d['text']}" for d in docs]
    return rows + TEXTS


@pytest.fixture(scope="module")
def mixed_texts() -> list[str]:
    return _mixed_texts()


def test_plain_ascii_check_is_the_normalizers_rule():
    """The fast check takes exactly the texts the shortcut is exact for: ASCII without a character
    BERT's normalizer deletes (tab, newline and carriage return stay)."""
    from bgekit.models.tokenization import _BERT_DELETES, _plain_ascii

    for code in range(256):
        text = f"ab{chr(code)}cd"
        assert _plain_ascii(text) == (text.isascii() and _BERT_DELETES.search(text) is None), code
    assert _plain_ascii("") and _plain_ascii("tab\tand\nnewline\r\n")
    assert not _plain_ascii(None) and not _plain_ascii(b"bytes") and not _plain_ascii("caf\u00e9")


@pytest.mark.parametrize("which", ["bert-cls", "minilm"])
def test_ascii_shortcut_gives_the_full_pipelines_ids(golden_dir, minilm_dir, mixed_texts, which):
    folder = minilm_dir if which == "minilm" else golden_dir / "models" / which
    hf = load_hf_tokenizer(folder)
    tokenizer = TextTokenizer(hf)
    assert tokenizer._untruncated.ascii is not None, "BERT's normalizer has the shortcut"
    assert sum(t.isascii() for t in mixed_texts) > 0.8 * len(mixed_texts)
    full = [len(ids) for ids in hf(mixed_texts)["input_ids"]]
    for max_length in (8, 64, 512):
        got = tokenizer.encode(mixed_texts, max_length)
        want = hf(mixed_texts, truncation=True, max_length=max_length)
        assert got.ids == want["input_ids"], max_length
        assert got.type_ids is None and not any(map(any, want["token_type_ids"]))  # None: all zeros
        assert got.truncated == sum(n > max_length for n in full)
    plain, _ = tokenizer.plain_ids(mixed_texts)
    assert plain == hf(mixed_texts, add_special_tokens=False)["input_ids"]


def test_ascii_shortcut_keeps_pairs_and_order(golden_dir, mixed_texts):
    """Pairs through the shortcut equal pairs through the full pipeline, in a batch that mixes
    both kinds of text (rows split between two Rust calls come back in input order)."""
    hf = load_hf_tokenizer(golden_dir / "models" / "bert-cls")
    fast = TextTokenizer(hf)
    reference = TextTokenizer(hf, ascii_shortcut=False)
    assert reference._untruncated.ascii is None and reference._truncating(32).ascii is None
    firsts, seconds = mixed_texts[::2], mixed_texts[1::2]
    firsts = firsts[: len(seconds)]
    for first_max, max_length in ((8, 32), (64, 512)):
        got = fast.encode_pairs(firsts, seconds, first_max, max_length)
        want = reference.encode_pairs(firsts, seconds, first_max, max_length)
        assert (got.ids, got.type_ids, got.truncated) == (want.ids, want.type_ids, want.truncated)


@pytest.mark.parametrize("folder", ["xlmr-m3", "mistral-llm", "gemma-llm-reranker"])
def test_other_normalizers_take_the_full_pipeline(golden_dir, folder):
    assert TextTokenizer(load_hf_tokenizer(golden_dir / "models" / folder))._untruncated.ascii is None
