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
