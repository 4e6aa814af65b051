"""LLM rerankers against FlagEmbedding 1.4.2: FlagLLMReranker, LayerWiseFlagLLMReranker
(bgekit's own MiniCPM layerwise architecture) and LightWeightFlagLLMReranker (bgekit's own
cost-wise Gemma-2 architecture, token compression included); plus their bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bgekit import (
    FlagAutoReranker,
    FlagLLMReranker,
    InputError,
    LayerWiseFlagLLMReranker,
    LightWeightFlagLLMReranker,
    ModelNotFoundError,
    Reranker,
)

from .conftest import SHARED
from .golden import ATOL, case_ids, check_returns, expected, golden_model_inputs, manifest, resolve_arg

GOLDEN = SHARED / "golden"
CLASSES = {
    "FlagLLMReranker": FlagLLMReranker,
    "LayerWiseFlagLLMReranker": LayerWiseFlagLLMReranker,
    "LightWeightFlagLLMReranker": LightWeightFlagLLMReranker,
}
CASES = case_ids(GOLDEN, set(CLASSES)) if (GOLDEN / "cases.json").exists() else []
PAIRS = [("what is panda?", "The giant panda is a bear native to China."), ("hi", "hello there, how are you?")]
_models: dict = {}


def build(golden_dir, case):
    key = (case["class"], case["model"], repr(sorted(case["init_kwargs"].items())))
    if key not in _models:
        _models[key] = CLASSES[case["class"]](str(golden_dir / case["model"]), **case["init_kwargs"])
    return _models[key]


def model_for(golden_dir, family: str):
    cls = LayerWiseFlagLLMReranker if family == "minicpm-layerwise" else LightWeightFlagLLMReranker
    return build(
        golden_dir,
        {
            "class": cls.__name__,
            "model": f"models/{family}",
            "init_kwargs": {"use_fp16": False, "devices": "cpu", "batch_size": 3},
        },
    )


def test_golden_cases_found(golden_dir):
    classes = {manifest(golden_dir)["cases"][name]["class"] for name in CASES}
    assert classes == set(CLASSES) and len(CASES) >= 13
    assert not any(manifest(golden_dir)["cases"][name].get("skipped") for name in CASES)


@pytest.mark.parametrize("name", CASES)
def test_golden_case(golden_dir, name):
    case = manifest(golden_dir)["cases"][name]
    model = build(golden_dir, case)
    args = [resolve_arg(golden_dir, a) for a in case["args"]]
    got = model.compute_score(*args, **case["call_kwargs"])
    check_returns(case, got)
    want = expected(golden_dir, case, "scores")
    if "list[list" in case["outputs"]["scores"]["kind"]:  # one list per cutoff layer
        assert all(isinstance(row, list) and len(row) == len(want[0]) for row in got)
    else:
        assert all(isinstance(x, float) for x in got)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", CASES)
def test_golden_token_ids(golden_dir, name):
    """The exact ids the transformer saw, per pair (batch layout may differ), and the padding side."""
    case = manifest(golden_dir)["cases"][name]
    model = build(golden_dir, case)
    kwargs = case["call_kwargs"]
    arg = resolve_arg(golden_dir, case["args"][0])
    pairs = model.detailed_pairs([tuple(arg)] if isinstance(arg, tuple) else [tuple(p) for p in arg])
    query_max_length, max_length = model._lengths(kwargs.get("query_max_length"), kwargs.get("max_length", 512))
    ids = model.pair_inputs(pairs, query_max_length, max_length, kwargs.get("prompt"))[0].ids
    assert sorted(tuple(x) for x in ids) == golden_model_inputs(golden_dir, case)

    z = np.load(golden_dir / case["model_inputs"]["file"])
    masks = [z[f"batch{b}/attention_mask"] for b in range(case["model_inputs"]["batches"])]
    assert all(m.shape[1] % 8 == 0 for m in masks), "batches are padded to a multiple of 8"
    right = all(m[:, 0].all() for m in masks)
    assert model.tokenizer.padding_side == ("right" if right else "left")
    batch = model.tokenizer.collate(ids[:3], None, 8)
    assert batch["attention_mask"].shape[1] % 8 == 0


# -- behaviour beyond the goldens ----------------------------------------------------------
def test_right_padded_pairs_run_the_head_only_where_rows_end(golden_dir):
    """Right padding (what training uses) gives the left-padded scores, with the language-model head
    run at the distinct last positions only, not at every position of the batch."""
    model = FlagLLMReranker(str(golden_dir / "models" / "gemma-llm-reranker"), use_fp16=False, devices="cpu")
    pairs = [("what is panda?", "The giant panda " * n) for n in (1, 3, 3, 9)] + PAIRS
    left = model.compute_score(pairs, batch_size=8)
    head = model.model.get_output_embeddings()
    seen: list[tuple[int, ...]] = []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    try:
        model.tokenizer.padding_side = "right"
        right = model.compute_score(pairs, batch_size=8)
    finally:
        hook.remove()
        model.tokenizer.padding_side = "left"
    np.testing.assert_allclose(right, left, rtol=0, atol=ATOL)
    ((rows, positions, _),) = seen
    assert rows == len(pairs) and 1 < positions < len(pairs)  # two pairs have the same length


@pytest.mark.parametrize("family", ["minicpm-layerwise", "gemma2-lightweight"])
def test_cutoff_order_single_int_and_batch_size(golden_dir, family):
    model = model_for(golden_dir, family)
    options = {"compress_ratio": 2, "compress_layers": [1]} if family == "gemma2-lightweight" else {}
    pairs = [tuple(p) for p in resolve_arg(golden_dir, {"input": "pairs"})]
    both = model.compute_score(pairs, cutoff_layers=[1, 2], **options)
    assert model.compute_score(pairs, cutoff_layers=[2, 1], **options) == both[::-1]
    last = model.compute_score(pairs, cutoff_layers=2, **options)
    assert isinstance(last, list) and all(isinstance(x, float) for x in last)
    np.testing.assert_allclose(last, model.compute_score(pairs, cutoff_layers=[2], **options), rtol=0, atol=0)
    for batch_size in (1, 64):
        again = model.compute_score(pairs, cutoff_layers=[1, 2], batch_size=batch_size, **options)
        np.testing.assert_allclose(again, both, rtol=0, atol=ATOL)


def test_lightweight_compression_changes_only_compressed_layers(golden_dir):
    model = model_for(golden_dir, "gemma2-lightweight")
    plain = model.compute_score(PAIRS, cutoff_layers=[1, 2])
    compressed = model.compute_score(PAIRS, cutoff_layers=[1, 2], compress_ratio=2, compress_layers=[1])
    assert compressed[0] == plain[0], "a cutoff equal to a compress layer reads the state before compression"
    assert not np.allclose(compressed[1], plain[1])
    # FlagEmbedding's deprecated spelling
    assert model.compute_score(PAIRS, cutoff_layers=[1, 2], compress_ratio=2, compress_layer=[1]) == compressed


@pytest.mark.parametrize("ratio", [2, 3, 5])
def test_compress_passages_matches_a_plain_loop(ratio):
    from bgekit.models.arch_costwise_gemma2 import compress_passages

    torch.manual_seed(0)
    lengths, queries, prompts = [17, 9, 12, 6], [4, 3, 5, 6], [3, 2, 4, 0]
    h = torch.randn(len(lengths), 20, 8)
    mask = torch.tensor([[1] * n + [0] * (20 - n) for n in lengths])
    got, new_mask = compress_passages(h, mask, torch.tensor(queries), torch.tensor(prompts), ratio)
    for row, (n, q, p) in enumerate(zip(lengths, queries, prompts, strict=True)):
        passage = h[row, q : n - p]
        runs = [passage[i : i + ratio].mean(dim=0) for i in range(0, len(passage), ratio)]
        want = torch.cat([h[row, :q], *(r[None] for r in runs), h[row, n - p : n]])
        assert new_mask[row].tolist() == [1] * len(want) + [0] * (got.shape[1] - len(want))
        torch.testing.assert_close(got[row, : len(want)], want, rtol=0, atol=1e-6)
        assert not got[row, len(want) :].any()


def test_lightweight_segments(golden_dir):
    """Type ids mark bos + query + sep (0), passage (1) and sep + prompt (2)."""
    model = model_for(golden_dir, "gemma2-lightweight")
    pairs = model.detailed_pairs(PAIRS)
    tokenized, tail = model.pair_inputs(pairs, 384, 512, None)
    tok = model.tokenizer.hf
    for ids, types, (query, _) in zip(tokenized.ids, tokenized.type_ids, pairs, strict=True):
        head = (
            1
            + len(tok(query, add_special_tokens=False)["input_ids"])
            + len(tok("\n", add_special_tokens=False)["input_ids"])
        )
        assert types == [0] * head + [1] * (len(ids) - head - tail) + [2] * tail
    prompt_ids = tok("Predict whether passage B contains an answer to query A.", add_special_tokens=False)["input_ids"]
    assert tokenized.ids[0][-len(prompt_ids) :] == prompt_ids


def test_layerwise_precision_flags(golden_dir):
    """FlagEmbedding turns fp16 on for the layerwise model when neither fp16 nor bf16 is asked;
    the CPU stays float32."""
    model = LayerWiseFlagLLMReranker(str(golden_dir / "models" / "minicpm-layerwise"), devices="cpu")
    assert model.use_fp16 and next(model.model.parameters()).dtype == torch.float32
    light = LightWeightFlagLLMReranker(str(golden_dir / "models" / "gemma2-lightweight"), devices="cpu")
    assert not light.use_fp16


def test_peft_adapter_is_merged(golden_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from bgekit.models.arch_minicpm_layerwise import LayerWiseMiniCPMReranker

    folder = golden_dir / "models" / "minicpm-layerwise"
    wrapped = peft.get_peft_model(
        LayerWiseMiniCPMReranker.from_folder(folder),
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    wrapped.save_pretrained(tmp_path)
    model = LayerWiseFlagLLMReranker(str(folder), devices="cpu", peft_path=str(tmp_path))
    assert isinstance(model.model, LayerWiseMiniCPMReranker)
    tokenized, _ = model.pair_inputs(model.detailed_pairs(PAIRS), 384, 512, None)
    inputs = model.tokenizer.collate(tokenized.ids, None, 8)
    with torch.inference_mode():
        want = wrapped(inputs["input_ids"], inputs["attention_mask"], cutoff_layers=[2])[:, 0]
    np.testing.assert_allclose(model.compute_score(PAIRS), want.numpy(), rtol=0, atol=ATOL)
    assert not np.allclose(model.compute_score(PAIRS), model_for(golden_dir, "minicpm-layerwise").compute_score(PAIRS))


# -- choosing the class ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "cls"),
    [
        ("gemma-llm-reranker", FlagLLMReranker),
        ("minicpm-layerwise", LayerWiseFlagLLMReranker),
        ("gemma2-lightweight", LightWeightFlagLLMReranker),
    ],
)
def test_auto_classes_pick_the_reranker(golden_dir, family, cls):
    folder = str(golden_dir / "models" / family)
    for model in (
        Reranker.from_pretrained(folder, devices="cpu"),
        FlagAutoReranker.from_finetuned(folder, devices="cpu"),
    ):
        assert type(model) is cls
    if cls is not FlagLLMReranker:
        assert isinstance(FlagAutoReranker.from_finetuned(folder, devices="cpu", cutoff_layers=[1]), cls)


def test_wrong_architecture_for_the_class(golden_dir):
    with pytest.raises(ModelNotFoundError, match="cost_wise_gemma"):
        LayerWiseFlagLLMReranker(str(golden_dir / "models" / "gemma2-lightweight"), devices="cpu")
    with pytest.raises(ModelNotFoundError, match="minicpm"):
        LightWeightFlagLLMReranker(str(golden_dir / "models" / "minicpm-layerwise"), devices="cpu")


# -- bad input ---------------------------------------------------------------------------------
BAD_CUTOFFS = [
    (0, "no score head"),
    (3, "no score head"),
    ([1, 5], r"\[5\] have no score head"),
    ([], "empty"),
    ([1, 1], "repeats"),
    (["2"], "must hold ints"),
    ([2.0], "must hold ints"),
    ([True], "must hold ints"),
    ("2", "int or a list"),
    (True, "int or a list"),
]


@pytest.mark.parametrize("family", ["minicpm-layerwise", "gemma2-lightweight"])
@pytest.mark.parametrize(("cutoffs", "message"), BAD_CUTOFFS)
def test_bad_cutoff_layers(golden_dir, family, cutoffs, message):
    model = model_for(golden_dir, family)
    with pytest.raises(InputError, match=message):
        model.compute_score(PAIRS, cutoff_layers=cutoffs)


@pytest.mark.parametrize("family", ["minicpm-layerwise", "gemma2-lightweight"])
def test_bad_cutoff_layers_at_construction(golden_dir, family):
    cls = LayerWiseFlagLLMReranker if family == "minicpm-layerwise" else LightWeightFlagLLMReranker
    with pytest.raises(InputError, match=r"\[1, 2\]"):
        cls(str(golden_dir / "models" / family), devices="cpu", cutoff_layers=[9])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compress_ratio": 0}, "compress_ratio must be an int >= 1"),
        ({"compress_ratio": -2}, "compress_ratio must be an int >= 1"),
        ({"compress_ratio": 1.5}, "compress_ratio must be an int >= 1"),
        ({"compress_ratio": True}, "compress_ratio must be an int >= 1"),
        ({"compress_ratio": 2, "compress_layers": [0]}, r"compress_layers \[0\] are outside"),
        ({"compress_ratio": 2, "compress_layers": [2]}, r"compress_layers \[2\] are outside"),
        ({"compress_ratio": 2, "compress_layers": [8]}, r"layers 1 to 1"),
        ({"compress_ratio": 2, "compress_layers": ["1"]}, "must hold ints"),
        ({"compress_ratio": 2, "compress_layer": [3]}, "outside"),
    ],
)
def test_bad_compression(golden_dir, options, message):
    model = model_for(golden_dir, "gemma2-lightweight")
    with pytest.raises(InputError, match=message):
        model.compute_score(PAIRS, **options)


def test_bad_compression_at_construction(golden_dir):
    folder = str(golden_dir / "models" / "gemma2-lightweight")
    with pytest.raises(InputError, match="compress_ratio"):
        LightWeightFlagLLMReranker(folder, devices="cpu", compress_ratio=0)
    with pytest.raises(InputError, match="outside"):
        LightWeightFlagLLMReranker(folder, devices="cpu", compress_ratio=2)  # default compress_layers [8]


def test_unknown_options(golden_dir):
    with pytest.raises(InputError, match="unexpected options"):
        model_for(golden_dir, "minicpm-layerwise").compute_score(PAIRS, compress_ratio=2)
    with pytest.raises(InputError, match="unexpected options"):
        model_for(golden_dir, "gemma2-lightweight").compute_score(PAIRS, use_dataloader=True)


@pytest.mark.parametrize("family", ["gemma-llm-reranker", "minicpm-layerwise", "gemma2-lightweight"])
def test_prompt_none_per_call_keeps_the_constructors_prompt(golden_dir, family):
    """FlagEmbedding: ``if prompt is None: prompt = self.prompt``; an explicit ``prompt=None`` in a call
    is the same as leaving it out (it used to mean the default prompt, dropping the constructor's)."""
    cls = {"gemma-llm-reranker": FlagLLMReranker, "minicpm-layerwise": LayerWiseFlagLLMReranker}.get(
        family, LightWeightFlagLLMReranker
    )
    model = cls(str(golden_dir / "models" / family), devices="cpu", prompt="Is B an answer to A?")
    own = model.compute_score(PAIRS)
    assert model.compute_score(PAIRS, prompt=None) == own
    assert model.compute_score(PAIRS, prompt="Is B an answer to A?") == own
    assert model.compute_score(PAIRS, prompt="Something else entirely.") != own
