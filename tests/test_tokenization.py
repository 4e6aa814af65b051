"""TextTokenizer.encode (truncation inside one Rust batch call) gives exactly what the Hugging Face
call ``tokenizer(texts, truncation=True, max_length=n)`` gives, and counts what it cut, for the
tokenizers of every family, both truncation sides, with and without special tokens."""

from __future__ import annotations

import pytest

from bgekit import InputError
from bgekit.models.tokenization import TextTokenizer, load_hf_tokenizer

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
        if tokenizer.uses_type_ids:
            assert got.type_ids == want["token_type_ids"]
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
