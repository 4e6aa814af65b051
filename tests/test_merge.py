"""``bgekit merge``: weighted averages of fine-tuned all-MiniLM-L6-v2 checkpoints (weights 1, 0
give the first model back bit for bit), LM-Cocktail weights from example losses, clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from bgekit import Embedder
from bgekit.errors import InputError
from bgekit.train.merge import merge_models, read_state_dict

from .cli import run

RECORDS = [
    ("what do pandas eat?", "The giant panda eats bamboo almost exclusively.", "Paris is the capital of France."),
    ("capital of france", "Paris is the capital and largest city of France.", "Pandas live in the mountains of China."),
    ("how do vaccines work", "Vaccines train the immune system to recognise a pathogen.", "Bamboo grows very fast."),
    ("speed of light", "Light travels at about 300,000 kilometres per second.", "Vaccines are given by injection."),
    ("who wrote hamlet", "Hamlet is a tragedy written by William Shakespeare.", "Light bends in a prism."),
    ("largest ocean", "The Pacific is the largest and deepest ocean on Earth.", "Shakespeare was born in 1564."),
]


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    path = tmp_path_factory.mktemp("merge-data") / "train.jsonl"
    path.write_text("".join(json.dumps({"query": q, "pos": [p], "neg": [n]}) + "\n" for q, p, n in RECORDS))
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, minilm_dir, examples):
    """Two short fine-tunes of all-MiniLM-L6-v2 that end in different weights."""
    from bgekit.train.embedder import EmbedderOptions, finetune_embedder

    root = tmp_path_factory.mktemp("merge-models")
    folders = []
    for name, seed, lr in (("a", 1, 5e-4), ("b", 2, 1e-3)):
        options = EmbedderOptions(
            output_dir=str(root / name),
            model_name_or_path=str(minilm_dir),
            train_data=[str(examples)],
            max_steps=2,
            per_device_train_batch_size=3,
            query_max_len=16,
            passage_max_len=24,
            learning_rate=lr,
            seed=seed,
            save_steps=100,
        )
        folders.append(finetune_embedder(options))
    return folders


def test_a_lora_runs_adapter_folder_is_not_copied_into_the_merge(tmp_path, finetuned):
    """A LoRA run's OUT holds OUT/adapter; merging copied the first model's into the merged folder, where
    ``Embedder.from_pretrained(MERGED/adapter)`` loaded that one model, not the merge."""
    a, b = finetuned
    first = tmp_path / "a"
    shutil.copytree(a, first)
    (first / "adapter").mkdir()
    (first / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(a)}))
    merged = merge_models([str(first), str(b)], [0.5, 0.5], output_dir=tmp_path / "merged").output_dir
    assert not (merged / "adapter").exists()
    assert (merged / "modules.json").exists() and (merged / "tokenizer.json").exists()


def test_weights_one_zero_give_the_first_model_back(tmp_path, finetuned):
    a, b = finetuned
    out = tmp_path / "merged"
    result = run("merge", "--models", str(a), str(b), "--weights", "1", "0", "--output-dir", str(out))
    assert result.stdout.split()[0] == "1.0000"
    merged, first, second = read_state_dict(out), read_state_dict(a), read_state_dict(b)
    assert merged.keys() == first.keys()
    assert all(torch.equal(merged[k], first[k]) for k in first)
    assert any(not torch.equal(first[k], second[k]) for k in first), "the two fine-tunes must differ"
    assert (out / "modules.json").exists() and (out / "1_Pooling" / "config.json").exists()
    texts = ["giant pandas eat bamboo", "where is paris"]
    np.testing.assert_array_equal(
        Embedder.from_pretrained(str(out)).encode(texts), Embedder.from_pretrained(str(a)).encode(texts)
    )
    assert json.loads((out / "merge_weights.json").read_text())["weights"] == [1.0, 0.0]

    half = merge_models([str(a), str(b)], [0.5, 0.5], output_dir=tmp_path / "half")
    averaged = read_state_dict(half.output_dir)
    key = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(averaged[key], (first[key] + second[key]) / 2)
    even = merge_models([str(a), str(b)], [1, 1], output_dir=tmp_path / "even")  # an average, not a sum
    assert json.loads((even.output_dir / "merge_weights.json").read_text())["weights"] == [0.5, 0.5]
    torch.testing.assert_close(read_state_dict(even.output_dir)[key], averaged[key])


def test_example_data_weights_favour_the_better_model(tmp_path, finetuned, examples):
    from transformers import AutoConfig, AutoModel

    a = finetuned[0]
    noise = tmp_path / "random-minilm"
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(str(a))).save_pretrained(str(noise))
    for item in a.iterdir():  # same tokenizer and sentence-transformers modules, random weights
        if not item.name.startswith(("model", "config.json", "checkpoint")):
            (shutil.copytree if item.is_dir() else shutil.copy)(item, noise / item.name)
    out = tmp_path / "cocktail"
    result = run("merge", "--models", str(noise), str(a), "--example-data", str(examples), "--output-dir", str(out))
    saved = json.loads((out / "merge_weights.json").read_text())
    assert sum(saved["weights"]) == pytest.approx(1.0)
    assert saved["losses"][1] < saved["losses"][0], "the fine-tuned model must fit its own data better"
    assert saved["weights"][1] > saved["weights"][0]
    expected = torch.softmax(-torch.tensor(saved["losses"]) / 5.0, dim=0)
    np.testing.assert_allclose(saved["weights"], expected.numpy(), rtol=1e-5)
    assert f"{saved['weights'][1]:.4f}  {a}" in result.stdout
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


def test_merge_errors(tmp_path, finetuned, tiny_bert, examples):
    from transformers import BertConfig, BertModel

    a, b = finetuned
    with pytest.raises(InputError, match="parameter names differ"):  # 6 layers vs 2
        merge_models([str(a), str(tiny_bert)], [0.5, 0.5], output_dir=tmp_path / "x")
    wider = tmp_path / "wider"
    config = BertConfig.from_pretrained(str(tiny_bert), intermediate_size=128)
    BertModel(config).save_pretrained(str(wider))
    with pytest.raises(InputError, match=r"intermediate\.dense\.\w+ has shape \(128"):
        merge_models([str(tiny_bert), str(wider)], [0.5, 0.5], output_dir=tmp_path / "x")
    with pytest.raises(InputError, match="got 3 weights for 2 models"):
        merge_models([str(a), str(b)], [0.2, 0.3, 0.5], output_dir=tmp_path / "x")
    with pytest.raises(InputError, match="either weights"):
        merge_models([str(a), str(b)], [0.5, 0.5], example_data=examples, output_dir=tmp_path / "x")
    with pytest.raises(InputError, match="at least two models"):
        merge_models([str(a)], [1.0], output_dir=tmp_path / "x")
    with pytest.raises(InputError, match="give weights"):
        merge_models([str(a), str(b)], output_dir=tmp_path / "x")
    with pytest.raises(InputError, match="is one of the models being merged"):
        merge_models([str(a), str(b)], [0.5, 0.5], output_dir=a)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InputError, match=r"a-file/merged cannot be created: .*a-file is a file"):
        merge_models([str(a), str(b)], [0.5, 0.5], output_dir=tmp_path / "a-file" / "merged")
    assert not (tmp_path / "x").exists()
    result = run(
        "merge", "--models", str(a), str(b), "--weights", "1", "--output-dir", str(tmp_path / "y"), check=False
    )
    assert result.returncode == 2 and "got 1 weights for 2 models" in result.stderr


def test_models_and_weights_are_documented_options(tmp_path, tiny_bert):
    """``--models`` / ``--weights`` are real options: listed in ``--help``, typed, and spelled either
    LM-Cocktail's way (several values after one flag) or once per value; a misspelt option is named."""
    from bgekit.train.cli import spread_values

    args = ["--models", "a", "b", "--weights", "1", "-0.5", "--output-dir", "o"]
    assert spread_values(args, ("--models", "--weights")) == [
        "--models", "a", "--models", "b", "--weights", "1", "--weights", "-0.5", "--output-dir", "o",
    ]  # fmt: skip
    assert spread_values(["--models=a", "b", "-v", "c"], ("--models",)) == ["--models=a", "--models", "b", "-v", "c"]
    help_text = run("merge", "--help").stdout
    assert "--models" in help_text and "--weights" in help_text and "One weight per model" in help_text
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert, copy)
    out = tmp_path / "merged"
    run(
        "merge",
        "--models",
        str(tiny_bert),
        "--models",
        str(copy),
        "--weights",
        "1",
        "--weights=3",
        "--output-dir",
        str(out),
    )
    assert json.loads((out / "merge_weights.json").read_text())["weights"] == [0.25, 0.75]
    for args, message in (
        (["--weights", "x"], "'--weights'"),
        (["--wieghts", "1", "0"], "No such option: --wieghts"),
        (["stray"], "(stray)"),
    ):
        result = run(
            "merge", "--models", str(tiny_bert), str(copy), "--output-dir", str(tmp_path / "z"), *args, check=False
        )
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    result = run("merge", "--output-dir", str(tmp_path / "z"), check=False)
    assert result.returncode == 2 and "Missing option '--models'" in result.stderr
    assert not (tmp_path / "z").exists()


def test_example_loss_sees_the_prompts_the_model_sees(tmp_path, golden_dir, examples):
    """A decoder's example loss uses its family's query format, as encode_queries does."""
    from bgekit import hub
    from bgekit.train import losses
    from bgekit.train.data import GroupSampler, load_train_data
    from bgekit.train.merge import example_loss

    folder = tmp_path / "decoder"
    shutil.copytree(golden_dir / "models" / "mistral-llm", folder)
    hub.write_folder_metadata(
        folder,
        "decoder-only-base",
        "last_token",
        query_instruction_for_retrieval="Find the passage",
        query_instruction_format="Instruct: {}\nQuery: {}",
    )
    records = load_train_data(examples)
    groups = [GroupSampler(records, 2, 42).group(i) for i in range(len(records))]
    model = Embedder.from_pretrained(str(folder), devices="cpu")
    q = torch.from_numpy(model.encode_queries([g.query for g in groups], max_length=64))
    p = torch.from_numpy(model.encode_corpus([text for g in groups for text in g.passages], max_length=256))
    expected = losses.info_nce(q, p, 2, 0.05).item()
    assert example_loss(folder, records, "embedder", group_size=2) == pytest.approx(expected, rel=1e-4)


def test_a_bf16_and_an_fp32_model_merge_and_save_in_float32(tmp_path, tiny_bert):
    """The mix is computed and saved in float32 whichever model comes first (LM-Cocktail saves its mix
    so); a bf16 first model cast the average to bf16, rounding away the fp32 model's small differences."""
    from transformers import BertModel

    torch.manual_seed(3)
    model = BertModel.from_pretrained(str(tiny_bert), dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 1e-3)
    half = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(str(half))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (tiny_bert / name).exists():
            shutil.copy(tiny_bert / name, half / name)
    first, second = read_state_dict(half), read_state_dict(tiny_bert)
    assert first["embeddings.word_embeddings.weight"].dtype == torch.bfloat16
    for order in ((half, tiny_bert), (tiny_bert, half)):
        out = merge_models([str(m) for m in order], [0.25, 0.75], output_dir=tmp_path / f"out-{order[0].name}")
        merged = read_state_dict(out.output_dir)
        states = [read_state_dict(m) for m in order]
        for key, tensor in merged.items():
            if tensor.is_floating_point():
                assert tensor.dtype == torch.float32, key
                expected = 0.25 * states[0][key].float() + 0.75 * states[1][key].float()
                torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-7)
        config = json.loads((out.output_dir / "config.json").read_text())
        assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert Embedder.from_pretrained(str(out.output_dir), devices="cpu").encode("hello").shape == (32,)
    assert first.keys() == second.keys()


def test_example_data_scores_an_llm_reranker_by_its_yes_logit(tmp_path, golden_dir, examples):
    """A causal-LM reranker's example loss is the group cross-entropy of FlagLLMReranker's scores
    (it was InfoNCE of pooled hidden states, or, with model_type=reranker, of a freshly drawn random
    classification head, so two copies of one model got different weights); a layerwise one is refused."""
    from bgekit import FlagLLMReranker
    from bgekit.train import losses
    from bgekit.train.data import GroupSampler, load_train_data
    from bgekit.train.merge import example_loss, model_kind

    folder = golden_dir / "models" / "gemma-llm-reranker"
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    records = load_train_data(examples)
    groups = [GroupSampler(records, 2, 42).group(i) for i in range(len(records))]
    scores = FlagLLMReranker(str(folder), devices="cpu").compute_score(
        [(g.query, p) for g in groups for p in g.passages], max_length=256, query_max_length=64
    )
    expected = losses.reranker_ce(torch.tensor(scores), 2).item()
    assert model_kind(folder) == model_kind(folder, "reranker") == "llm-reranker"
    assert example_loss(folder, records, "llm-reranker", group_size=2) == pytest.approx(expected, rel=1e-4)
    for model_type in ("auto", "reranker"):
        result = merge_models(
            [str(folder), str(copy)], example_data=examples, model_type=model_type, group_size=2,
            output_dir=tmp_path / model_type,
        )  # fmt: skip
        assert result.losses[0] == result.losses[1] == pytest.approx(expected, rel=1e-4)
        assert result.weights == [0.5, 0.5]
    with pytest.raises(InputError, match="layerwise reranker: example losses are not computed"):
        merge_models(
            [str(golden_dir / "models" / "minicpm-layerwise")] * 2, example_data=examples, output_dir=tmp_path / "lw"
        )


def test_a_pretrain_output_merges_with_its_plain_encoder(tmp_path, tiny_bert):
    """A ``bgekit pretrain`` folder (a masked-LM BERT, ``bert.``-prefixed, plus the RetroMAE decoder) merges
    with the plain encoder it started from, as LM-Cocktail merges them: encoder weights by name, the MLM
    head and decoder dropped, the plain encoder's layout and pooler kept. It was refused (names differ)."""

    from bgekit.train.pretrain import DECODER_FILE, PretrainOptions, pretrain

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"wing {i} lift at speed {i * 7} and drag"}) + "\n" for i in range(8))
    )
    pretrained = pretrain(
        PretrainOptions(
            output_dir=str(tmp_path / "pretrained"),
            model_name_or_path=str(tiny_bert),
            train_data=[str(corpus)],
            max_steps=2,
            per_device_train_batch_size=4,
            max_seq_length=32,
            learning_rate=1e-2,
        )
    )
    assert (pretrained / DECODER_FILE).exists()
    mlm, plain = read_state_dict(pretrained), read_state_dict(tiny_bert)  # gamma/beta names as weight/bias
    for order, weights in (((pretrained, tiny_bert), [0.25, 0.75]), ((tiny_bert, pretrained), [0.75, 0.25])):
        out = merge_models([str(m) for m in order], weights, output_dir=tmp_path / f"merged-{order[0].name}")
        merged = read_state_dict(out.output_dir)
        assert merged.keys() == plain.keys(), "the plain encoder's names, pooler included; no MLM head"
        for key, tensor in merged.items():
            if not tensor.is_floating_point():
                continue
            if key.startswith("pooler."):  # only the plain encoder has one: its own
                torch.testing.assert_close(tensor, plain[key].float(), rtol=0, atol=0)
            else:
                expected = 0.25 * mlm[f"bert.{key}"].float() + 0.75 * plain[key].float()
                torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-7)
        assert not (out.output_dir / DECODER_FILE).exists()
        assert json.loads((out.output_dir / "config.json").read_text())["architectures"] == ["BertModel"]
        assert Embedder.from_pretrained(str(out.output_dir), devices="cpu").encode("hello").shape == (32,)
    assert (
        mlm["bert.encoder.layer.0.attention.self.query.weight"]
        .ne(plain["encoder.layer.0.attention.self.query.weight"])
        .any()
    ), "pre-training changed the encoder"


def test_pretrain_outputs_merged_together_average_their_decoders(tmp_path, tiny_bert):
    """Two ``bgekit pretrain`` outputs merge into a pretrain output whose RetroMAE decoder is the weighted
    average of theirs (it was the first one's, copied), and pre-training goes on from it."""
    from safetensors.torch import load_file

    from bgekit.train.pretrain import DECODER_FILE, PretrainOptions, pretrain

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"wing {i} lift at speed {i * 7}"}) + "\n" for i in range(8)))

    def pretrained(name: str, seed: int, start=tiny_bert, steps: int = 2):
        options = PretrainOptions(
            output_dir=str(tmp_path / name),
            model_name_or_path=str(start),
            train_data=[str(corpus)],
            max_steps=steps,
            per_device_train_batch_size=4,
            max_seq_length=32,
            learning_rate=1e-2,
            seed=seed,
        )
        return pretrain(options)

    a, b = pretrained("a", 1), pretrained("b", 2)
    out = merge_models([str(a), str(b)], [0.25, 0.75], output_dir=tmp_path / "merged").output_dir
    first, second, merged = (load_file(str(f / DECODER_FILE)) for f in (a, b, out))
    assert merged.keys() == first.keys()
    assert any(first[k].ne(second[k]).any() for k in first), "the two runs trained different decoders"
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.25 * first[key].float() + 0.75 * second[key].float(), rtol=0, atol=1e-7)
    encoder = read_state_dict(out)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    expected = 0.25 * read_state_dict(a)[key].float() + 0.75 * read_state_dict(b)[key].float()
    torch.testing.assert_close(encoder[key], expected, rtol=0, atol=1e-7)
    assert (pretrained("c", 3, start=out, steps=1) / DECODER_FILE).exists(), "pre-training goes on from it"


def test_example_loss_of_an_icl_embedder_sees_its_few_shot_examples(tmp_path, golden_dir, examples):
    """An ICL embedder's example loss embeds the queries as FlagICLModel does, behind the model's few-shot
    examples (``--examples``) and ending with the ICL suffix; they were scored as plain instructed queries."""
    from bgekit import hub
    from bgekit.train import losses
    from bgekit.train.data import GroupSampler, load_train_data
    from bgekit.train.merge import example_loss

    folder = tmp_path / "icl"
    shutil.copytree(golden_dir / "models" / "mistral-icl", folder)
    hub.write_folder_metadata(
        folder,
        "decoder-only-icl",
        "last_token",
        query_instruction_for_retrieval="Find the passage",
        query_instruction_format="<instruct>{}\n<query>{}",
    )
    shots = [{"instruct": "Find the passage", "query": "what do koalas eat", "response": "Koalas eat eucalyptus."}]
    shots_file = tmp_path / "shots.json"
    shots_file.write_text(json.dumps(shots))
    records = load_train_data(examples)
    groups = [GroupSampler(records, 2, 42).group(i) for i in range(len(records))]
    for shown in (shots, None):
        model = Embedder.from_pretrained(str(folder), devices="cpu", use_fp16=False, examples_for_task=shown)
        q = torch.from_numpy(model.encode_queries([g.query for g in groups], max_length=64))
        p = torch.from_numpy(model.encode_corpus([text for g in groups for text in g.passages], max_length=256))
        expected = losses.info_nce(q, p, 2, 0.05).item()
        assert example_loss(folder, records, "embedder", group_size=2, examples=shown) == pytest.approx(
            expected, rel=1e-4
        )
    run(
        "merge",
        "--models",
        str(folder),
        str(folder),
        "--example-data",
        str(examples),
        "--examples",
        str(shots_file),
        "--output-dir",
        str(tmp_path / "mixed"),
        "--group-size",
        "2",
    )
    saved = json.loads((tmp_path / "mixed" / "merge_weights.json").read_text())
    assert saved["losses"][0] == pytest.approx(example_loss(folder, records, "embedder", group_size=2, examples=shots))
    with pytest.raises(InputError, match="not an ICL embedder"):
        example_loss(golden_dir / "models" / "bert-cls", records, "embedder", examples=shots)
