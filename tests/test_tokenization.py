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


@pytest.mark.parametrize("folder", ["bert-cls", "xlmr-m3", "mistral-llm"])
def test_a_call_can_cut_the_other_side(golden_dir, folder):
    """``truncation_side`` on one call cuts that side (the HF call with that side), leaving the tokenizer's own
    side for the next call: the server cuts a request's texts from the start without touching the model."""
    hf = load_hf_tokenizer(golden_dir / "models" / folder)
    tokenizer = TextTokenizer(hf)
    assert tokenizer.truncation_side == "right"
    left = tokenizer.encode(TEXTS, 16, truncation_side="left")
    hf.truncation_side = "left"
    assert left.ids == hf(TEXTS, truncation=True, max_length=16)["input_ids"] and left.truncated == 2
    hf.truncation_side = "right"
    assert tokenizer.encode(TEXTS, 16).ids == hf(TEXTS, truncation=True, max_length=16)["input_ids"]
    with pytest.raises(InputError, match="truncation_side must be 'left' or 'right'"):
        tokenizer.encode(TEXTS, 16, truncation_side="start")


@pytest.mark.parametrize("folder", ["bert-cls", "mistral-llm"])
def test_one_text_honours_a_calls_truncation_side(golden_dir, folder):
    """One ``str`` went to the Hugging Face ``encode``, which has no per-call side: ``truncation_side="left"``
    was ignored and the end was cut. It is cut as a list of one text is (the HF call with that side), and is
    still a list of ids; without a side, the HF ``encode`` as before."""
    hf = load_hf_tokenizer(golden_dir / "models" / folder)
    tokenizer = TextTokenizer(hf)
    text = TEXTS[3]
    left = tokenizer.encode(text, 16, truncation_side="left")
    assert left == tokenizer.encode([text], 16, truncation_side="left").ids[0]
    hf.truncation_side = "left"
    assert left == hf(text, truncation=True, max_length=16)["input_ids"]
    hf.truncation_side = "right"
    assert left != tokenizer.encode(text, 16, truncation_side="right")
    assert tokenizer.encode(text, 16, truncation_side="right") == hf.encode(text, truncation=True, max_length=16)
    assert tokenizer.encode(text) == hf.encode(text) and tokenizer.truncation_side == hf.truncation_side == "right"
    with pytest.raises(InputError, match="truncation_side must be 'left' or 'right'"):
        tokenizer.encode(text, 16, truncation_side="start")
    with pytest.raises(InputError, match="takes no Hugging Face options"):
        tokenizer.encode(text, 16, truncation_side="left", return_tensors="pt")


def test_clip_texts_cuts_at_token_boundaries_of_the_text(golden_dir, minilm_dir):
    tokenizer = TextTokenizer(load_hf_tokenizer(minilm_dir))
    texts = ["The giant panda eats bamboo every day.", "short", ""]
    assert tokenizer.clip_texts(texts, 3) == (["The giant panda", "short", ""], 1)
    assert tokenizer.clip_texts(texts, 3, from_start=True) == (["every day.", "short", ""], 1)
    xlmr = TextTokenizer(load_hf_tokenizer(golden_dir / "models" / "xlmr-m3"))
    (cut,), n = xlmr.clip_texts([TEXTS[4]], 5)
    assert n == 1 and TEXTS[4].startswith(cut) and xlmr.plain_ids([cut])[0][0] == xlmr.plain_ids([TEXTS[4]])[0][0][:5]
    with pytest.raises(InputError, match="not valid Unicode"):
        tokenizer.clip_texts(["ok", "bad \ud800"], 3)


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
        for whole_up_to in (None, max_length + 12, 10**9):
            got = tokenizer.encode_pairs(firsts, seconds, first_max, max_length, whole_up_to)
            want = tokenizer._encode_pairs_one_by_one(firsts, seconds, first_max, max_length, whole_up_to)
            assert got.ids == want.ids, (folder, side, first_max, max_length, whole_up_to)
            assert got.type_ids == want.type_ids and got.truncated == want.truncated
            assert max(map(len, got.ids)) <= (max_length if whole_up_to is None else whole_up_to)


@pytest.mark.parametrize(("query_max_length", "max_length"), [(None, 512), (None, 16), (None, 12), (30, 20), (40, 32)])
def test_cross_encoder_pairs_follow_prepare_for_model(golden_dir, query_max_length, max_length):
    """FlagEmbedding 1.4.2 cuts the query to query_max_length and the passage to max_length on their own,
    then calls ``prepare_for_model(q, p, truncation="only_second", max_length)``, which cuts the passage
    only if that is enough: a query that fills max_length on its own leaves the pair whole (longer than
    max_length), it does not shrink the query to make room."""
    from bgekit import FlagReranker

    model = FlagReranker(str(golden_dir / "models" / "xlmr-reranker"), devices="cpu")
    hf = model.tokenizer.hf
    firsts = [t for t in TEXTS if t] + ["a query that is long enough to be cut " * 8]
    seconds = [*reversed(TEXTS), "short"][: len(firsts)]
    pairs = list(zip(firsts, seconds, strict=False))
    q_max = max_length * 3 // 4 if query_max_length is None else query_max_length
    queries = hf([q for q, _ in pairs], add_special_tokens=False, truncation=True, max_length=q_max)["input_ids"]
    passages = hf([p for _, p in pairs], add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    cls, sep = hf.cls_token_id, hf.sep_token_id
    want = []
    for q, p in zip(queries, passages, strict=True):
        over = len(q) + len(p) + 4 - max_length
        if 0 < over < len(p):
            p = p[:-over]
        want.append([cls, *q, sep, sep, *p, sep])
    got = model.tokenize_pairs(pairs, query_max_length=query_max_length, max_length=max_length)
    assert got.ids == want
    if max_length == 12:
        assert max(map(len, want)) > max_length, "the case where a query fills max_length is covered"
        assert len(model.compute_score(pairs, max_length=max_length)) == len(pairs)


def test_cross_encoder_pair_past_the_positions_is_still_cut(golden_dir):
    """Where FlagEmbedding's uncut pair would run past the model's position table (an index error
    there), the pair is cut to the positions instead: the passage side first, then the query."""
    from bgekit import FlagReranker

    model = FlagReranker(str(golden_dir / "models" / "xlmr-reranker"), devices="cpu")
    assert model.host.max_positions == 512
    pair = ("panda " * 600, "bamboo " * 600)
    ids = model.tokenize_pairs([pair], query_max_length=512, max_length=512).ids[0]
    assert len(ids) == 512 and ids.count(model.tokenizer.hf.sep_token_id) == 3, "one passage token is left"
    assert len(model.compute_score([pair], query_max_length=512, max_length=512)) == 1


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
