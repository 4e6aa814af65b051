"""Prompt construction for decoder embedders, ICL and LLM rerankers: exact token ids on tricky inputs.

The reference ids are built independently with the Hugging Face tokenizer's own ``__call__``
and ``batch_decode``, following FlagEmbedding's recipe step by step; bgekit's fast path
(the Rust backend, truncation by hand) must give the same ids.
"""

from __future__ import annotations

import pytest

from bgekit import FlagICLModel, FlagLLMModel, FlagLLMReranker, InputError

LONG = " ".join(["retrieval"] * 300)
QUERIES = [
    "what is BGE?",
    "Zürich café naïve résumé — 北京今天的天气怎么样？ 🍕",
    LONG,  # longer than any budget used below
    "",
]
EXAMPLES = [
    {"instruct": "Given a question, find the answer.", "query": "what is a panda", "response": "A bear. " * 40},
    {"query": "où est Paris ?", "response": "En France."},  # no instruct: the query instruction is used
]


def icl_reference(model: FlagICLModel, queries: list[str], max_length: int, prefix: str) -> list[list[int]]:
    tok = model.tokenizer.hf
    fmt, instruction = model.query_instruction_format, model.query_instruction_for_retrieval
    texts = [fmt.format(instruction, q) for q in queries] if instruction is not None else queries
    len1 = len(tok("<s>", add_special_tokens=False)["input_ids"])
    len2 = len(tok("\n<response></s>", add_special_tokens=False)["input_ids"])
    ids = tok(texts, max_length=max_length - len1 - len2, truncation=True, add_special_tokens=False)["input_ids"]
    decoded = tok.batch_decode(ids)
    limit = (
        len(tok(prefix, add_special_tokens=False)["input_ids"])
        + len(tok("\n<response>", add_special_tokens=False)["input_ids"])
        + max_length
        + 8
    ) // 8 * 8 + 8
    full = [prefix + d + "\n<response>" for d in decoded]
    return tok(full, truncation=True, max_length=limit, add_special_tokens=True)["input_ids"]


@pytest.fixture(scope="module")
def icl(golden_dir):
    return FlagICLModel(
        str(golden_dir / "models" / "mistral-icl"),
        devices="cpu",
        query_instruction_for_retrieval="Given a web search query, retrieve relevant passages.",
        examples_for_task=EXAMPLES,
    )


@pytest.mark.parametrize("max_length", [24, 44, 512])
@pytest.mark.parametrize("instruction", ["Given a web search query, retrieve relevant passages.", "", None])
@pytest.mark.parametrize("with_examples", [True, False])
def test_icl_query_ids(icl, max_length, instruction, with_examples):
    icl.query_instruction_for_retrieval = instruction
    try:
        prefix = icl.examples_prefix(EXAMPLES if with_examples else None)
        got = icl.tokenize_queries(QUERIES, max_length, prefix).ids
        assert got == icl_reference(icl, QUERIES, max_length, prefix)
    finally:
        icl.query_instruction_for_retrieval = "Given a web search query, retrieve relevant passages."


def test_icl_prefix_layout(icl):
    assert icl.prefix == (
        "<instruct>Given a question, find the answer.\n<query>what is a panda\n<response>"
        + "A bear. " * 40
        + "\n\n<instruct>Given a web search query, retrieve relevant passages.\n<query>où est Paris ?\n<response>"
        "En France.\n\n"
    )
    assert icl.examples_prefix(None) == ""


def test_icl_examples_per_call_and_set_examples(icl):
    base = icl.encode_queries(QUERIES[:2])
    other = icl.encode_queries(QUERIES[:2], examples_for_task=EXAMPLES[1:])
    assert not (base == other).all()
    icl.set_examples(EXAMPLES[1:])
    try:
        assert (icl.encode_queries(QUERIES[:2]) == other).all()
    finally:
        icl.set_examples(EXAMPLES)
    corpus = icl.encode_corpus(["a passage"])
    plain = FlagLLMModel(icl.model_name_or_path, devices="cpu").encode_corpus(["a passage"])
    assert abs(corpus - plain).max() < 1e-6, "passages are encoded plainly, without examples"


def test_icl_empty_examples_list_keeps_the_separator(golden_dir, icl):
    """FlagEmbedding 1.4.2: examples_for_task=[] gives the prefix "\\n\\n" (None gives "")."""
    folder = str(golden_dir / "models" / "mistral-icl")
    instruction = "Given a web search query, retrieve relevant passages."
    empty = FlagICLModel(folder, devices="cpu", query_instruction_for_retrieval=instruction, examples_for_task=[])
    assert empty.prefix == "\n\n"
    assert empty.tokenize_queries(QUERIES, 64).ids == icl_reference(empty, QUERIES, 64, "\n\n")
    none = FlagICLModel(folder, devices="cpu", query_instruction_for_retrieval=instruction)
    assert none.prefix == "" and none.tokenize_queries(QUERIES, 64).ids == icl_reference(none, QUERIES, 64, "")
    assert (empty.encode_queries(QUERIES[:2]) == icl.encode_queries(QUERIES[:2], examples_for_task=[])).all()
    assert abs(empty.encode_queries(QUERIES[:2]) - none.encode_queries(QUERIES[:2])).max() > 1e-4


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        ([{"instruct": "x", "response": "y"}], r"examples_for_task\[0\] is missing \['query'\]"),
        ([{"query": "q"}], r"missing \['response'\]"),
        ([{"query": 3, "response": "r"}], "must be a string"),
        ("not a list", "must be a list"),
        ([["q", "r"]], "must be a dict"),
    ],
)
def test_icl_bad_examples(golden_dir, icl, examples, message):
    with pytest.raises(InputError, match=message):
        icl.encode_queries(["q"], examples_for_task=examples)
    with pytest.raises(InputError, match=message):
        FlagICLModel(str(golden_dir / "models" / "mistral-icl"), devices="cpu", examples_for_task=examples)


def test_icl_max_length_too_small(icl):
    with pytest.raises(InputError, match="leaves no room"):
        icl.encode_queries(["q"], max_length=3)


@pytest.mark.parametrize("max_length", [16, 40, 512])
def test_llm_embedder_truncates_the_query_not_the_instruction(golden_dir, max_length):
    model = FlagLLMModel(
        str(golden_dir / "models" / "mistral-llm"),
        devices="cpu",
        query_instruction_for_retrieval="Retrieve passages.",
        query_instruction_format="<instruct>{}\n<query>{}",
    )
    tok = model.tokenizer.hf
    texts = [f"<instruct>Retrieve passages.\n<query>{q}" for q in QUERIES]
    expected = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    assert model.tokenizer.encode(texts, max_length).ids == expected
    assert all(len(ids) <= max_length for ids in expected)
    assert expected[2][-1] == tok.eos_token_id, "eos survives truncation"


def reranker_reference(model: FlagLLMReranker, pairs, query_max_length, max_length, prompt):
    """``pairs`` already carry the "A: " / "B: " instructions."""
    tok = model.tokenizer.hf
    queries = tok([q for q, _ in pairs], add_special_tokens=False, truncation=True, max_length=query_max_length)
    passages = tok([p for _, p in pairs], add_special_tokens=False, truncation=True, max_length=max_length)
    sep = tok("\n", add_special_tokens=False)["input_ids"]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and tok.bos_token_id != tok.pad_token_id else []
    limit = max_length + len(sep) + len(prompt_ids)
    out = []
    for q, p in zip(queries["input_ids"], passages["input_ids"], strict=True):
        first, second = bos + q, sep + p
        # prepare_for_model(first, second, truncation="only_second"): the passage side gives way on the
        # tokenizer's truncation side, and only if it can absorb the overflow (else nothing is cut)
        over = len(first) + len(second) - limit
        if 0 < over < len(second):
            second = second[over:] if tok.truncation_side == "left" else second[:-over]
        out.append(first + second + sep + prompt_ids)
    return out


# (300, 16): the long query fills the pair's budget on its own, so FlagEmbedding cuts nothing
@pytest.mark.parametrize(("query_max_length", "max_length"), [(8, 16), (24, 32), (384, 512), (300, 16)])
@pytest.mark.parametrize("prompt", [None, "Is B relevant to A? Answer Yes or No. ¿Sí?"])
def test_llm_reranker_prompt_ids(golden_dir, query_max_length, max_length, prompt):
    model = FlagLLMReranker(str(golden_dir / "models" / "gemma-llm-reranker"), devices="cpu")
    pairs = model.detailed_pairs([(q, p) for q in QUERIES for p in QUERIES])
    got, _ = model.pair_inputs(pairs, query_max_length, max_length, prompt)
    from bgekit.models.llm_reranker import DEFAULT_PROMPT

    expected = reranker_reference(model, pairs, query_max_length, max_length, prompt or DEFAULT_PROMPT)
    assert got.ids == expected


@pytest.mark.parametrize("prompt", ["", None])
def test_llm_reranker_truncates_on_the_tokenizers_side(golden_dir, tmp_path, prompt):
    """A tokenizer saved with ``truncation_side="left"`` cuts the pair's passage side from the left (the
    ``\\n`` separator and the passage's head go first), as ``prepare_for_model`` does in FlagEmbedding."""
    import json
    import shutil

    from bgekit.models.llm_reranker import DEFAULT_PROMPT

    folder = shutil.copytree(golden_dir / "models" / "gemma-llm-reranker", tmp_path / "left")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "truncation_side": "left"}))
    model = FlagLLMReranker(str(folder), devices="cpu")
    assert model.tokenizer.hf.truncation_side == "left"
    pairs = model.detailed_pairs([(q, p) for q in QUERIES for p in QUERIES])
    for query_max_length, max_length in ((8, 16), (24, 32), (300, 16)):
        got, _ = model.pair_inputs(pairs, query_max_length, max_length, prompt)
        want = reranker_reference(
            model, pairs, query_max_length, max_length, DEFAULT_PROMPT if prompt is None else prompt
        )
        assert got.ids == want
