"""LoRA fine-tuning of decoder-only embedders and LLM rerankers on tiny random Mistral, Gemma and
Qwen3 models (real transformers architectures): the loss on a fixed batch falls, the merged
folder and base + adapter give the same vectors and scores, training feeds the model the same
token ids inference does, the CLI form works, and bad LoRA settings fail clearly."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bgekit import Embedder, FlagAutoReranker, FlagLLMModel, FlagLLMReranker, InputError, ModelNotFoundError, Reranker
from bgekit.train import losses
from bgekit.train.embedder import EmbedderCollator, EmbedderOptions, finetune_embedder
from bgekit.train.reranker import RerankerOptions, finetune_reranker

from .test_eval_reference import slow_requested

pytest.importorskip("peft")

INSTRUCTION = "Find the item that does this."
FORMAT = "<instruct>{}\n<query>{}"
PROMPT = "Does B answer A?"  # shorter than the default prompt: fewer tokens to train on
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# arch -> (golden folder whose tokenizer it borrows, padding side)
ARCHS = {"mistral": ("mistral-llm", "left"), "gemma": ("gemma-llm-reranker", "left"), "qwen3": ("mistral-llm", "right")}


def build_llm(target: Path, arch: str, golden_dir: Path) -> Path:
    """A 2-layer causal LM (hidden 32) of ``arch`` with a golden folder's tokenizer."""
    import transformers

    source, padding_side = ARCHS[arch]
    source = golden_dir / "models" / source
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, target / name)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "padding_side": padding_side}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(target))
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "initializer_range": 0.2,
    }
    config_class, model_class = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    torch.manual_seed(5)
    model_class(config_class(**common)).save_pretrained(str(target))
    return target


@pytest.fixture(scope="module")
def tiny_llms(tmp_path_factory, golden_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llms")
    return {arch: build_llm(root / arch, arch, golden_dir) for arch in ARCHS}


RECORDS = [
    {
        "query": f"what opens door number {i}?",
        "pos": [f"key {i} opens door number {i}"],
        "neg": [f"key {(i + 3) % 12} closes window {i}", f"the weather on day {i} was mild"],
    }
    for i in range(12)
]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def common_options(out: Path, model: Path, train_file: Path, **overrides) -> dict:
    return {
        "output_dir": str(out),
        "model_name_or_path": str(model),
        "train_data": [str(train_file)],
        "max_steps": 10,
        "per_device_train_batch_size": 4,
        "train_group_size": 3,
        "learning_rate": 5e-3,
        "warmup_ratio": 0.0,
        "logging_steps": 5,
        "save_steps": 1000,
        "use_lora": True,
        "lora_rank": 8,
        "lora_alpha": 16.0,
        "lora_dropout": 0.0,
        **overrides,
    }


def embedding_loss(model: FlagLLMModel) -> float:
    """InfoNCE (temperature 0.05) of every query against its positive and first negative."""
    q = torch.from_numpy(model.encode_queries([r["query"] for r in RECORDS]))
    p = torch.from_numpy(model.encode_corpus([t for r in RECORDS for t in (r["pos"][0], r["neg"][0])]))
    return float(losses.info_nce(q, p, 2, 0.05))


def reranker_loss(model: FlagLLMReranker) -> float:
    """Group cross-entropy of the positive against the two negatives."""
    pairs = [(r["query"], t) for r in RECORDS for t in (r["pos"][0], *r["neg"])]
    return float(losses.reranker_ce(torch.tensor(model.compute_score(pairs, prompt=PROMPT)), 3))


def llm_embedder(path, **kwargs) -> FlagLLMModel:
    options = {"query_instruction_for_retrieval": INSTRUCTION, "query_instruction_format": FORMAT}
    return FlagLLMModel(str(path), use_fp16=False, devices="cpu", **{**options, **kwargs})


def slow(arch: str, extra: dict):
    """One run of each task stays in the quick suite; the other architectures run with the slow checks."""
    return pytest.param(arch, extra, marks=pytest.mark.slow, id=arch)


def skip_unless_slow(request) -> None:
    if request.node.get_closest_marker("slow") and not slow_requested(request.config):
        pytest.skip("more architectures: run with BGEKIT_SLOW=1 or -m slow")


# (arch, extra options): added special tokens and gradient checkpointing on the quick one
EMBEDDER_RUNS = [
    pytest.param(
        "mistral",
        {"additional_special_tokens": ["<instruct>", "<query>"], "gradient_checkpointing": True},
        id="mistral",
    ),
    slow("gemma", {}),
    slow("qwen3", {}),
]


@pytest.mark.parametrize(("arch", "extra"), EMBEDDER_RUNS)
def test_lora_embedder_trains_and_both_forms_agree(request, tmp_path, tiny_llms, train_file, arch, extra):
    skip_unless_slow(request)
    base = tiny_llms[arch]
    out = tmp_path / "out"
    options = EmbedderOptions(
        **common_options(out, base, train_file, **extra),
        query_instruction_for_retrieval=INSTRUCTION,
        query_instruction_format=FORMAT,
        passage_max_len=64,
    )
    assert finetune_embedder(options) == out
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "config.json").exists()
    merged = Embedder.from_pretrained(str(out), devices="cpu", use_fp16=False)
    assert isinstance(merged, FlagLLMModel) and merged.pooling_method == "last_token"
    assert (merged.query_instruction_for_retrieval, merged.query_instruction_format) == (INSTRUCTION, FORMAT)
    assert json.loads((out / "bgekit.json").read_text())["query_instruction_format"] == FORMAT
    adapted = llm_embedder(base, peft_path=str(out / "adapter"))
    texts = [r["query"] for r in RECORDS[:4]]
    np.testing.assert_allclose(merged.encode_queries(texts), adapted.encode_queries(texts), rtol=0, atol=1e-5)
    passages = [r["pos"][0] for r in RECORDS[:4]]
    np.testing.assert_allclose(merged.encode_corpus(passages), adapted.encode_corpus(passages), rtol=0, atol=1e-5)
    assert embedding_loss(adapted) < embedding_loss(llm_embedder(base)) - 0.05, "training must lower the loss"
    st = pytest.importorskip("sentence_transformers").SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(st.encode(passages), merged.encode_corpus(passages), rtol=0, atol=1e-5)
    np.testing.assert_allclose(st.encode(texts, prompt_name="query"), merged.encode_queries(texts), rtol=0, atol=1e-5)
    if "additional_special_tokens" in extra:
        n = len(merged.tokenizer.hf)
        assert {n - 2, n - 1} <= set(merged.tokenize(["x"], "query").ids[0]), "<instruct> and <query> are tokens now"
        assert merged.model.get_input_embeddings().weight.shape[0] == len(merged.tokenizer.hf)


def unpadded(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_queries_are_the_token_ids_inference_feeds(tiny_llms, arch):
    from transformers import AutoTokenizer

    from bgekit.train.data import Group
    from bgekit.train.trainer import training_tokenizer

    options = EmbedderOptions(
        output_dir="unused",
        query_instruction_for_retrieval=INSTRUCTION,
        query_instruction_format=FORMAT,
        query_max_len=24,
        passage_max_len=16,
    )
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tiny_llms[arch]))
    collator = EmbedderCollator(training_tokenizer(hf_tokenizer), options)
    queries = ["a short one", "a much longer question about the weather on day seven and eight " * 3]
    passages = ["first passage text", "second"]
    batch = collator([Group(q, [p], None, None) for q, p in zip(queries, passages, strict=True)])
    model = llm_embedder(tiny_llms[arch], query_max_length=24, passage_max_length=16)
    assert unpadded(batch["query"]) == model.tokenize(queries, "query").ids
    assert unpadded(batch["passage"]) == model.tokenize(passages, "passage").ids
    # training pads on the right whatever inference does (left pads gave NaN gradients on CUDA);
    # the saved tokenizer keeps its own side for inference
    mask = batch["passage"]["attention_mask"]
    assert bool(mask[:, 0].all()) and not bool(mask[:, -1].all()), "right padding in training"
    assert hf_tokenizer.padding_side == ARCHS[arch][1]


RERANKER_RUNS = [
    pytest.param("gemma", {"gradient_checkpointing": True}, id="gemma"),
    slow("mistral", {"additional_special_tokens": ["<sep>"]}),
    slow("qwen3", {}),
]


@pytest.mark.parametrize(("arch", "extra"), RERANKER_RUNS)
def test_lora_llm_reranker_trains_and_both_forms_agree(request, tmp_path, tiny_llms, train_file, arch, extra):
    skip_unless_slow(request)
    base = tiny_llms[arch]
    out = tmp_path / "rr"
    options = RerankerOptions(
        **common_options(out, base, train_file, **extra), query_max_len=16, max_len=48, prompt=PROMPT
    )
    assert finetune_reranker(options) == out
    merged = Reranker.from_pretrained(str(out), devices="cpu")
    assert isinstance(merged, FlagLLMReranker)
    adapted = FlagLLMReranker(str(base), peft_path=str(out / "adapter"), devices="cpu")
    pairs = [(r["query"], r["pos"][0]) for r in RECORDS[:4]] + [(r["query"], r["neg"][1]) for r in RECORDS[:4]]
    np.testing.assert_allclose(
        merged.compute_score(pairs, prompt=PROMPT), adapted.compute_score(pairs, prompt=PROMPT), rtol=0, atol=1e-5
    )
    before = reranker_loss(FlagLLMReranker(str(base), devices="cpu"))
    assert reranker_loss(merged) < before - 0.05, "training must lower the loss"


def test_reranker_training_pairs_are_the_token_ids_inference_feeds(tiny_llms):
    from transformers import AutoTokenizer

    from bgekit.train.data import Group
    from bgekit.train.llm_reranker import LLMRerankerCollator
    from bgekit.train.trainer import training_tokenizer

    base = tiny_llms["gemma"]
    options = RerankerOptions(output_dir="unused", query_max_len=8, max_len=24)
    collator = LLMRerankerCollator(training_tokenizer(AutoTokenizer.from_pretrained(str(base))), options)
    group = Group("what opens door number seven in the house?", ["key seven " * 20, "no"], None, None)
    batch = collator([group])["pairs"]
    assert batch["input_ids"].shape[1] % 8 == 0, "padded to a multiple of 8, as at inference"
    reranker = FlagLLMReranker(str(base), devices="cpu", query_max_length=8, max_length=24)
    assert unpadded(batch) == reranker.tokenize_pairs([(group.query, p) for p in group.passages]).ids
    # a record's own `prompt` is its task prompt (FlagEmbedding's LLM reranker data); teacher scores ride along
    own = Group("is it seven?", ["seven", "six"], [2.0, -1.0], "Does B answer A? Yes or No.")
    batch = collator([group, own])
    assert (
        unpadded(batch["pairs"])[2:]
        == reranker.tokenize_pairs([(own.query, p) for p in own.passages], prompt="Does B answer A? Yes or No.").ids
    )
    assert unpadded(batch["pairs"])[:2] == reranker.tokenize_pairs([(group.query, p) for p in group.passages]).ids
    assert collator([own])["teacher_scores"].tolist() == [[2.0, -1.0]]


def cli(*args: str, code: int = 0):
    """Run ``bgekit ARGS`` in this process (typer's runner), as a user would from the shell."""
    from typer.testing import CliRunner

    from bgekit.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result


def test_cli_lora_embedder_and_adapter_only_reranker(tmp_path, tiny_llms, train_file):
    base = tiny_llms["qwen3"]
    shared = ["--train-data", str(train_file), "--max-steps", "2", "--per-device-train-batch-size", "2", "--lora"]
    lora = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.05", "--target-modules", "q_proj,v_proj"]
    out = tmp_path / "emb"
    cli("finetune", "embedder", "--model", str(base), "--output-dir", str(out), *shared, *lora,
        "--query-instruction-for-retrieval", INSTRUCTION, "--query-instruction-format", "<instruct>{}\\n<query>{}",
        "--additional-special-tokens", "<instruct>", "--additional-special-tokens", "<query>")  # fmt: skip
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_dropout"] == 0.05
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    model = Embedder.from_pretrained(str(out), devices="cpu", use_fp16=False)
    assert (model.query_instruction_for_retrieval, model.query_instruction_format) == (INSTRUCTION, FORMAT)
    assert model.encode_queries("what opens door 3?").shape == (32,)
    assert "<instruct>" in model.tokenizer.hf.get_vocab()
    out = tmp_path / "rr"
    cli("finetune", "reranker", "--model", str(base), "--output-dir", str(out), *shared, *lora,
        "--no-save-merged-model", "--train-group-size", "2", "--prompt", PROMPT)  # fmt: skip
    assert (out / "adapter" / "adapter_model.safetensors").exists() and not (out / "config.json").exists()
    reranker = FlagLLMReranker(str(base), peft_path=str(out / "adapter"), devices="cpu", prompt=PROMPT)
    pairs = [("q", "p"), ("what opens door 3?", "key 3")]
    scores = reranker.compute_score(pairs)
    assert len(scores) == 2 and np.isfinite(scores).all()
    # the adapter folder alone: its base with the adapter, as the LLM reranker it trained as, with its prompt
    alone = Reranker.from_pretrained(str(out / "adapter"), devices="cpu")
    assert isinstance(alone, FlagLLMReranker) and alone.prompt == PROMPT
    np.testing.assert_allclose(alone.compute_score(pairs), scores, rtol=0, atol=1e-5)
    other = Reranker.from_pretrained(str(out / "adapter"), devices="cpu", prompt="Is B relevant to A?")
    assert other.prompt == "Is B relevant to A?", "a prompt passed in wins over the recorded one"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora_rank": 0}, "lora_rank must be an int >= 1"),
        ({"lora_dropout": 1.5}, "lora_dropout must be in"),
        ({"lora_alpha": 0}, "lora_alpha must be > 0"),
        ({"target_modules": ["q_proj", "query_key_value"]}, r"target_modules \['query_key_value'\] are not"),
    ],
)
def test_bad_lora_settings_are_clear_errors(tmp_path, tiny_llms, train_file, overrides, message):
    out = tmp_path / "never"
    with pytest.raises(InputError, match=message):
        finetune_embedder(EmbedderOptions(**common_options(out, tiny_llms["mistral"], train_file, **overrides)))
    with pytest.raises(InputError, match=message):
        finetune_reranker(RerankerOptions(**common_options(out, tiny_llms["gemma"], train_file, **overrides)))
    assert not (out / "adapter").exists()


def test_cli_bad_target_module_and_missing_peft(tmp_path, tiny_llms, train_file, monkeypatch):
    result = cli("finetune", "embedder", "--model", str(tiny_llms["gemma"]), "--train-data", str(train_file),
                 "--output-dir", str(tmp_path / "x"), "--lora", "--target-modules", "qproj", code=2)  # fmt: skip
    assert "['qproj'] are not linear layers" in result.output and "q_proj" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    cli("finetune", "reranker", "--model", str(tiny_llms["gemma"]), "--train-data", str(train_file),
        "--output-dir", str(tmp_path / "x"), "--lora", "--lora-rank", "0", code=2)  # fmt: skip
    monkeypatch.setitem(sys.modules, "peft", None)  # as if the lora extra were not installed
    with pytest.raises(InputError, match=r"pip install 'bgekit\[lora\]'"):
        finetune_embedder(EmbedderOptions(**common_options(tmp_path / "y", tiny_llms["gemma"], train_file)))


def test_decoder_embedder_rejects_cls_pooling(tmp_path, tiny_llms, train_file):
    options = EmbedderOptions(**common_options(tmp_path / "z", tiny_llms["gemma"], train_file, use_lora=False))
    options.sentence_pooling_method = "cls"
    with pytest.raises(InputError, match="pools the last token"):
        finetune_embedder(options)


def test_lora_on_encoders_saves_loadable_merged_models(tmp_path, tiny_bert, train_file):
    from bgekit import FlagModel, FlagReranker

    options = common_options(tmp_path / "emb", tiny_bert, train_file, max_steps=2, lora_rank=4)
    out = finetune_embedder(EmbedderOptions(**options, sentence_pooling_method="mean", passage_max_len=32))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["dense", "key", "query", "value"]
    tuned = Embedder.from_pretrained(str(out), devices="cpu")
    assert isinstance(tuned, FlagModel) and tuned.pooling_method == "mean"
    before = FlagModel(str(tiny_bert), pooling_method="mean", devices="cpu").encode("hello there")
    assert np.abs(tuned.encode("hello there") - before).max() > 1e-4, "the merged LoRA changed the weights"
    options = common_options(tmp_path / "rr", tiny_bert, train_file, max_steps=2, lora_rank=4)
    out = finetune_reranker(RerankerOptions(**options, max_len=48))
    reranker = Reranker.from_pretrained(str(out), devices="cpu")
    assert isinstance(reranker, FlagReranker) and len(reranker.compute_score([("q", "p"), ("q", "r")])) == 2


def test_a_bf16_lora_run_merges_its_whole_update(tmp_path, tiny_llms, train_file):
    """Under bf16 the base loads in bf16, the adapter trains in float32; the merged model is the base plus
    the adapter's update in float32 (FlagEmbedding merges into a float32 base), not rounded back to bf16,
    which dropped every change smaller than half a bf16 step of the weight it lands on."""
    from safetensors.torch import load_file

    model = tiny_llms["mistral"]
    extra = {"query_instruction_for_retrieval": INSTRUCTION, "query_instruction_format": FORMAT}
    options = common_options(tmp_path / "out", model, train_file, bf16=True, max_steps=2, learning_rate=1e-3, **extra)
    out = Path(finetune_embedder(EmbedderOptions(**options)))
    merged = load_file(str(out / "model.safetensors"))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    base = {k.removeprefix("model."): v for k, v in load_file(str(model / "model.safetensors")).items()}
    scaling = options["lora_alpha"] / options["lora_rank"]
    checked = 0
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        expected = base[name].to(torch.bfloat16).float() + scaling * (b.float() @ a.float())
        assert merged[name].dtype == torch.float32, name
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
        checked += 1
    assert checked == 14, "every attention and MLP projection of both layers carries LoRA"
    assert Embedder.from_pretrained(str(out), use_fp16=False, devices="cpu").encode_queries(["x"]).shape == (1, 32)


@pytest.mark.parametrize("head", ["trained", "none"], ids=["reranker-base", "encoder-base"])
def test_cross_encoder_adapter_loads_over_its_base(request, tmp_path, train_file, head):
    """``FlagReranker(base, peft_path=OUT/adapter)`` merges the adapter (and its trained score head), scoring
    as the merged ``OUT``; the option was warned about and ignored, leaving the base's scores. A base
    without a score head (a plain encoder) gets the one-label head training gave it."""
    from bgekit import FlagReranker

    base = request.getfixturevalue("tiny_bert_reranker" if head == "trained" else "tiny_bert")
    options = common_options(tmp_path / "rr", base, train_file, max_steps=2, lora_rank=4, learning_rate=1e-2)
    out = finetune_reranker(RerankerOptions(**options, max_len=48))
    pairs = [(r["query"], t) for r in RECORDS[:3] for t in (r["pos"][0], r["neg"][0])]
    merged = FlagReranker(str(out), devices="cpu").compute_score(pairs)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ignores unknown options")  # peft_path was ignored
        adapted = FlagReranker(str(base), peft_path=str(out / "adapter"), devices="cpu")
    np.testing.assert_allclose(adapted.compute_score(pairs), merged, rtol=0, atol=1e-5)
    assert np.abs(np.subtract(merged, FlagReranker(str(base), devices="cpu").compute_score(pairs))).max() > 1e-4
    # by family: a plain encoder base with a classifier adapter is a cross-encoder (it was a bi-encoder)
    auto = Reranker.from_pretrained(str(base), peft_path=str(out / "adapter"), devices="cpu")
    assert isinstance(auto, FlagReranker)
    np.testing.assert_allclose(auto.compute_score(pairs), merged, rtol=0, atol=1e-5)
    # the adapter folder alone loads its base with it (it was 'a LoRA adapter, not a whole model')
    alone = Reranker.from_pretrained(str(out / "adapter"), devices="cpu")
    assert isinstance(alone, FlagReranker)
    np.testing.assert_allclose(alone.compute_score(pairs), merged, rtol=0, atol=1e-5)
    auto_alone = FlagAutoReranker.from_finetuned(str(out / "adapter"), devices="cpu")
    np.testing.assert_allclose(auto_alone.compute_score(pairs), merged, rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="load the merged model"):
        FlagReranker(str(base), peft_path=str(out / "adapter"), devices="cpu", backend="onnx")


def test_encoder_embedder_adapter_loads_over_its_base(tmp_path, tiny_bert, train_file):
    """``FlagModel(base, peft_path=OUT/adapter)`` merges an encoder's LoRA adapter at load and gives the
    merged ``OUT``'s vectors (it was warned about and ignored, leaving the base's)."""
    from bgekit import FlagModel

    options = common_options(tmp_path / "emb", tiny_bert, train_file, max_steps=2, lora_rank=4, learning_rate=1e-2)
    out = finetune_embedder(EmbedderOptions(**options, sentence_pooling_method="mean", passage_max_len=32))
    texts = ["hello there", "key 3 opens door number 3"]
    merged = Embedder.from_pretrained(str(out), devices="cpu").encode(texts)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ignores unknown options")  # peft_path was ignored
        adapted = FlagModel(str(tiny_bert), pooling_method="mean", devices="cpu", peft_path=str(out / "adapter"))
    np.testing.assert_allclose(adapted.encode(texts), merged, rtol=0, atol=1e-5)
    base = FlagModel(str(tiny_bert), pooling_method="mean", devices="cpu").encode(texts)
    assert np.abs(base - merged).max() > 1e-4
    with pytest.raises(InputError, match="load the merged model"):
        FlagModel(str(tiny_bert), devices="cpu", backend="onnx", peft_path=str(out / "adapter"))
    assert (out / "adapter" / "bgekit.json").exists()
    from_adapter = Embedder.from_pretrained(str(out / "adapter"), devices="cpu")
    np.testing.assert_allclose(from_adapter.encode(texts), merged, rtol=0, atol=1e-5)


def test_an_adapter_only_decoder_embedder_loads_as_the_model_it_came_from(tmp_path, tiny_llms, train_file):
    """``--no-save-merged-model`` leaves only ``OUT/adapter``; it now carries ``bgekit.json`` (family,
    pooling, instruction), so ``Embedder.from_pretrained(OUT/adapter)`` is the base with the adapter as the
    decoder embedder it trained as. It was refused ('a LoRA adapter, not a whole model') and the base alone
    would have lost the instruction and format."""
    base = tiny_llms["mistral"]
    options = common_options(
        tmp_path / "emb", base, train_file, max_steps=2, lora_rank=4, learning_rate=1e-2, save_merged_lora_model=False
    )
    out = finetune_embedder(
        EmbedderOptions(**options, query_instruction_for_retrieval=INSTRUCTION, query_instruction_format=FORMAT)
    )
    assert out == tmp_path / "emb" / "adapter" and not (tmp_path / "emb" / "config.json").exists()
    meta = json.loads((out / "bgekit.json").read_text())
    assert (meta["model_class"], meta["pooling_method"]) == ("decoder-only-base", "last_token")
    model = Embedder.from_pretrained(str(out), devices="cpu", use_fp16=False)
    assert isinstance(model, FlagLLMModel)
    assert (model.query_instruction_for_retrieval, model.query_instruction_format) == (INSTRUCTION, FORMAT)
    queries, passages = ["what opens door number 3?"], ["key 3 opens door number 3"]
    adapted = FlagLLMModel(
        str(base),
        devices="cpu",
        use_fp16=False,
        peft_path=str(out),
        query_instruction_for_retrieval=INSTRUCTION,
        query_instruction_format=FORMAT,
    )
    np.testing.assert_allclose(model.encode_queries(queries), adapted.encode_queries(queries), rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.encode_corpus(passages), adapted.encode_corpus(passages), rtol=0, atol=1e-6)
    plain = FlagLLMModel(
        str(base),
        devices="cpu",
        use_fp16=False,
        query_instruction_for_retrieval=INSTRUCTION,
        query_instruction_format=FORMAT,
    )
    assert np.abs(plain.encode_queries(queries) - model.encode_queries(queries)).max() > 1e-4, "the adapter is used"
    (tmp_path / "queries.txt").write_text(queries[0] + "\n")
    cli("embed", "--model", str(out), "--input", str(tmp_path / "queries.txt"), "--output", str(tmp_path / "q.npy"),
        "--queries", "--device", "cpu", "--no-fp16")  # fmt: skip
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), model.encode_queries(queries), rtol=0, atol=1e-5)


def test_an_adapter_whose_base_moved_is_a_clear_error(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    (folder / "bgekit.json").write_text(
        json.dumps({"model_class": "decoder-only-base", "pooling_method": "last_token"})
    )
    with pytest.raises(ModelNotFoundError, match=r"is a LoRA adapter over .*gone.*peft_path="):
        Embedder.from_pretrained(str(folder))
    (folder / "bgekit.json").write_text(json.dumps({"model_class": "decoder-only-base"}))  # an LLM reranker's
    with pytest.raises(ModelNotFoundError, match=r"is a LoRA adapter over .*gone.*peft_path="):
        Reranker.from_pretrained(str(folder))


def test_an_adapter_trained_from_a_relative_base_folder_loads_from_anywhere(
    tmp_path, tiny_bert, train_file, monkeypatch
):
    """peft records the base as it was given; a folder relative to the training's working directory left
    an adapter that loaded nowhere else. It is recorded as an absolute path now."""
    import os

    monkeypatch.chdir(tiny_bert.parent)
    options = common_options(tmp_path / "rr", Path(os.path.relpath(tiny_bert)), train_file, max_steps=1, lora_rank=4)
    out = finetune_reranker(RerankerOptions(**options, max_len=48))
    recorded = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded) == tiny_bert.resolve()
    monkeypatch.chdir(tmp_path)
    pairs = [("what opens door 3?", "key 3"), ("what opens door 3?", "a cat")]
    alone = Reranker.from_pretrained(str(out / "adapter"), devices="cpu")
    np.testing.assert_allclose(
        alone.compute_score(pairs), Reranker.from_pretrained(str(out)).compute_score(pairs), atol=1e-5
    )


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_from_peft_goes_on_training_the_adapter(tmp_path, tiny_llms, train_file):
    """``from_peft`` (FlagEmbedding's): the run starts from the adapter's own weights and settings (the
    rank passed is not used), trains them, keeps its added tokens, and saves both loadable forms."""
    base = tiny_llms["qwen3"]
    prompts = {"query_instruction_for_retrieval": INSTRUCTION, "query_instruction_format": FORMAT}
    first = finetune_embedder(
        EmbedderOptions(
            **common_options(tmp_path / "first", base, train_file, max_steps=2, lora_rank=4),
            target_modules=["q_proj", "v_proj"],
            additional_special_tokens=["<instruct>", "<query>"],
            **prompts,
        )
    )
    start = adapter_weights(first / "adapter")
    lr, steps = 1e-3, 2
    # the --lora run's OUT stands for its OUT/adapter; lora_rank 8 is the adapter's business, not this run's
    out = finetune_embedder(
        EmbedderOptions(
            **common_options(tmp_path / "next", base, train_file, max_steps=steps, learning_rate=lr, use_lora=False),
            from_peft=str(first),
            **prompts,
        )
    )
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(base.resolve())
    end = adapter_weights(out / "adapter")
    assert end.keys() == start.keys()
    lora_a = [k for k in start if "lora_A" in k]
    # Adam moves a weight by about lr a step: a fresh adapter (random lora_A) would be far off
    assert max(float((end[k] - start[k]).abs().max()) for k in lora_a) < 5 * lr * steps
    assert any(not torch.equal(end[k], start[k]) for k in lora_a), "the adapter trains on"
    merged = Embedder.from_pretrained(str(out), devices="cpu", use_fp16=False)
    assert "<instruct>" in merged.tokenizer.hf.get_vocab()
    alone = Embedder.from_pretrained(str(out / "adapter"), devices="cpu", use_fp16=False)
    queries = ["what opens door number 3?"]
    np.testing.assert_allclose(merged.encode_queries(queries), alone.encode_queries(queries), rtol=0, atol=1e-5)


def test_modules_to_save_train_whole_and_both_forms_load(tmp_path, tiny_llms, train_file):
    """``modules_to_save`` (passed to peft's LoraConfig, as FlagEmbedding): the named modules train whole,
    the adapter carries them, and the merged folder and the adapter folder score alike."""
    base = tiny_llms["qwen3"]
    options = common_options(
        tmp_path / "rr", base, train_file, max_steps=2, lora_rank=4, learning_rate=1e-2, train_group_size=2
    )
    out = finetune_reranker(
        RerankerOptions(**options, modules_to_save=["embed_tokens", "lm_head"], max_len=48, prompt=PROMPT)
    )
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) >= {"embed_tokens", "lm_head"}
    saved = adapter_weights(out / "adapter")
    assert any("embed_tokens" in k for k in saved) and any("lm_head" in k for k in saved)
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(str(base)).state_dict()
    after = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} trains whole"
    pairs = [("what opens door 3?", "key 3 opens door number 3"), ("q", "p")]
    merged = Reranker.from_pretrained(str(out), devices="cpu", use_fp16=False)
    alone = Reranker.from_pretrained(str(out / "adapter"), devices="cpu", use_fp16=False)
    np.testing.assert_allclose(merged.compute_score(pairs), alone.compute_score(pairs), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"from_peft": "nowhere"}, "not a LoRA adapter folder"),
        ({"modules_to_save": ["embed_tokens"], "use_lora": False}, "pass use_lora"),
        ({"modules_to_save": ["no_such_module"]}, "not modules of this model"),
    ],
)
def test_bad_from_peft_and_modules_to_save_are_clear_errors(tmp_path, tiny_llms, train_file, overrides, message):
    options = common_options(tmp_path / "bad", tiny_llms["qwen3"], train_file, max_steps=1)
    with pytest.raises(InputError, match=message):
        finetune_embedder(EmbedderOptions(**{**options, **overrides}))


def flag_embedding_run(
    folder: Path, base: Path, extra_tokens: list[str], auto_class: str = "AutoModel"
) -> torch.Tensor:
    """A folder as FlagEmbedding's decoder-only fine-tuning leaves it when it added tokens: a LoRA adapter
    (random, non-zero B; without embedding layers, so only emb.pth holds the new rows), the tokenizer with
    the tokens, and ``embedding/emb.pth``, the resized input embedding module saved whole with
    ``torch.save``. Returns that module's weight. ``auto_class``: the model the adapter is for (an
    embedder's ``AutoModel``, an LLM reranker's ``AutoModelForCausalLM``)."""
    import peft
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.add_special_tokens({"additional_special_tokens": extra_tokens}, replace_extra_special_tokens=False)
    model = getattr(transformers, auto_class).from_pretrained(str(base))
    model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(3)
    embedding = torch.nn.Embedding(len(tokenizer), model.config.hidden_size)
    model.set_input_embeddings(embedding)
    (folder / "embedding").mkdir(parents=True)
    torch.save(embedding, folder / "embedding" / "emb.pth")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(str(folder), save_embedding_layers=False)
    tokenizer.save_pretrained(str(folder))
    return embedding.weight.detach().clone()


def merged_by_peft(
    base: Path, adapter: Path, embedding: torch.Tensor, auto_class: str = "AutoModel", save_to: Path | None = None
) -> dict[str, torch.Tensor]:
    """What FlagEmbedding's raw_peft makes of ``base``: emb.pth as input embeddings, the adapter merged
    (saved in ``save_to`` with the adapter's tokenizer, when given)."""
    import peft
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(str(base))
    model.resize_token_embeddings(embedding.shape[0])
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embedding)
    merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if save_to is not None:
        merged.save_pretrained(str(save_to))
        transformers.AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(save_to))
    return merged.state_dict()


@pytest.mark.parametrize("lora", [False, True])
def test_raw_peft_merges_a_flag_embedding_adapter_and_its_embeddings_before_training(
    tmp_path, tiny_llms, train_file, lora
):
    """``raw_peft`` (FlagEmbedding's): the adapter is merged into the base before training, after its
    folder's ``embedding/emb.pth`` replaced the input embeddings (two added tokens). With learning rate 0
    the saved model is exactly that merged base, with the adapter folder's tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    base = tiny_llms["mistral"]
    fe_run = tmp_path / "fe-run"
    embedding = flag_embedding_run(fe_run, base, ["<a1>", "<a2>"])
    want = merged_by_peft(base, fe_run, embedding)
    options = common_options(tmp_path / "out", base, train_file, max_steps=1, learning_rate=0.0, use_lora=lora)
    out = finetune_embedder(EmbedderOptions(**options, raw_peft=[str(fe_run)]))
    got = AutoModel.from_pretrained(str(out)).state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    start = AutoModel.from_pretrained(str(base)).state_dict()
    assert not torch.equal(got["layers.0.self_attn.q_proj.weight"], start["layers.0.self_attn.q_proj.weight"])
    assert "<a2>" in AutoTokenizer.from_pretrained(str(out)).get_vocab()


def test_from_peft_loads_a_flag_embedding_runs_saved_embeddings(tmp_path, tiny_llms, train_file):
    """``from_peft`` of a FlagEmbedding run's folder: its ``embedding/emb.pth`` (the token embeddings it
    resized for added tokens) is loaded under the adapter, as FlagEmbedding does; before, the added
    tokens' rows were fresh ones and the run trained another model than the one it continued."""
    from transformers import AutoModel

    base = tiny_llms["mistral"]
    fe_run = tmp_path / "fe-run"
    embedding = flag_embedding_run(fe_run, base, ["<b1>"])
    options = common_options(tmp_path / "out", base, train_file, max_steps=1, learning_rate=0.0, use_lora=False)
    out = finetune_embedder(EmbedderOptions(**options, from_peft=str(fe_run)))
    got = AutoModel.from_pretrained(str(out)).state_dict()
    want = merged_by_peft(base, fe_run, embedding)
    torch.testing.assert_close(got["embed_tokens.weight"], embedding, rtol=0, atol=0)
    torch.testing.assert_close(got["layers.1.self_attn.v_proj.weight"], want["layers.1.self_attn.v_proj.weight"])


def test_peft_path_of_a_flag_embedding_run_loads_its_saved_embeddings(tmp_path, tiny_llms):
    """``FlagLLMModel(BASE, peft_path=RUN)`` and ``FlagLLMReranker(BASE, peft_path=RUN)`` of a FlagEmbedding
    run that added tokens: its ``embedding/emb.pth`` becomes the input embeddings before the adapter merges,
    as training's raw_peft / from_peft load it; before, inference kept the base's rows (fresh random ones for
    the added tokens) and gave another model's vectors and scores than the run's merged model."""
    base = tiny_llms["mistral"]
    texts = ["what opens <t1> door?", "key <t2> opens it", "a plain sentence"]
    embedder_run, embedder_merged = tmp_path / "fe-embedder", tmp_path / "embedder-merged"
    embedding = flag_embedding_run(embedder_run, base, ["<t1>", "<t2>"])
    merged_by_peft(base, embedder_run, embedding, save_to=embedder_merged)
    options = {"use_fp16": False, "devices": "cpu"}
    want = FlagLLMModel(str(embedder_merged), **options).encode(texts)
    got = FlagLLMModel(str(base), peft_path=str(embedder_run), **options).encode(texts)
    np.testing.assert_allclose(got, want, atol=1e-5)
    by_name = Embedder.from_pretrained(str(base), peft_path=str(embedder_run), **options).encode(texts)
    np.testing.assert_allclose(by_name, want, atol=1e-5)

    reranker_run, reranker_merged = tmp_path / "fe-reranker", tmp_path / "reranker-merged"
    embedding = flag_embedding_run(reranker_run, base, ["<t1>", "<t2>"], auto_class="AutoModelForCausalLM")
    merged_by_peft(base, reranker_run, embedding, auto_class="AutoModelForCausalLM", save_to=reranker_merged)
    pairs = [(texts[0], texts[1]), (texts[0], texts[2])]
    want = FlagLLMReranker(str(reranker_merged), **options).compute_score(pairs)
    got = FlagLLMReranker(str(base), peft_path=str(reranker_run), **options).compute_score(pairs)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_raw_peft_errors_are_clear(tmp_path, tiny_llms, train_file):
    options = common_options(tmp_path / "bad", tiny_llms["mistral"], train_file, max_steps=1)
    with pytest.raises(InputError, match=r"raw_peft nowhere: no adapter_config\.json"):
        finetune_embedder(EmbedderOptions(**options, raw_peft=["nowhere"]))
    fe_run = tmp_path / "fe-run"
    flag_embedding_run(fe_run, tiny_llms["mistral"], ["<c1>"])
    with pytest.raises(InputError, match="keep save_merged_lora_model"):
        finetune_embedder(EmbedderOptions(**options, raw_peft=[str(fe_run)], save_merged_lora_model=False))
    (fe_run / "embedding" / "emb.pth").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match=r"emb\.pth: not a saved embedding module"):
        finetune_embedder(EmbedderOptions(**{**options, "use_lora": False}, raw_peft=[str(fe_run)]))


def test_use_flash_attn_without_flash_attn_is_one_clear_line(tmp_path, tiny_llms, train_file):
    """``--use-flash-attn`` (FlagEmbedding's option) on a machine without the flash-attn package: one line
    naming it, before any model loads; the reranker command takes the option too."""
    import importlib.util

    from .cli import run

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    for command in ("embedder", "reranker"):
        result = run(
            "finetune",
            command,
            "--model",
            str(tiny_llms["mistral"]),
            "--train-data",
            str(train_file),
            "--output-dir",
            str(tmp_path / command),
            "--use-flash-attn",
            check=False,
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        (line,) = [ln for ln in result.stderr.splitlines() if "flash" in ln]
        assert "needs the flash-attn package" in line
