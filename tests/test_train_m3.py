"""BGE-M3 unified fine-tuning on the tiny golden M3 model: every head's loss falls, the sparse
head stays alive, a heads-only run leaves the encoder bit for bit, and the saved folder loads
in ``BGEM3FlagModel`` with outputs that moved."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bgekit import BGEM3FlagModel, Embedder
from bgekit.errors import InputError
from bgekit.models.m3 import colbert_score, lexical_score, token_weight_dict
from bgekit.train import losses

from .cli import run


@pytest.fixture(scope="module")
def m3_golden(golden_dir):
    return golden_dir / "models" / "xlmr-m3"


@pytest.fixture(scope="module")
def texts(golden_dir):
    return json.loads((golden_dir / "inputs.json").read_text())


@pytest.fixture(scope="module")
def m3_train_file(tmp_path_factory, texts):
    queries, passages = texts["queries"], texts["passages"]
    rows = [
        {"query": queries[i], "pos": [passages[i]], "neg": [passages[(i + 3) % 8], passages[(i + 5) % 8]]}
        for i in range(8)
    ]
    path = tmp_path_factory.mktemp("m3data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def m3_start(tmp_path_factory, tiny_xlmr):
    """A tiny XLM-R with new M3 heads: the start of a run that builds an M3 model from an encoder."""
    import shutil

    from bgekit.train.m3 import new_sparse_head

    folder = tmp_path_factory.mktemp("m3start") / "m3"
    shutil.copytree(tiny_xlmr, folder)
    torch.manual_seed(3)
    torch.save(torch.nn.Linear(32, 32).state_dict(), folder / "colbert_linear.pt")
    torch.save(new_sparse_head(32, 0.05).state_dict(), folder / "sparse_linear.pt")
    return folder


def _history(folder):
    return [h for h in json.loads((folder / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_score_functions_match_inference():
    torch.manual_seed(0)
    q_ids, p_ids = torch.randint(3, 12, (3, 7)), torch.randint(3, 12, (5, 9))
    q_w, p_w = torch.relu(torch.randn(3, 7)), torch.relu(torch.randn(5, 9))
    got = losses.m3_sparse_scores(q_ids, q_w, p_ids, p_w)
    for i in range(3):
        for j in range(5):
            a = token_weight_dict(q_ids[i].numpy(), q_w[i].numpy(), set())
            b = token_weight_dict(p_ids[j].numpy(), p_w[j].numpy(), set())
            assert got[i, j].item() == pytest.approx(float(lexical_score(a, b)), abs=1e-5)
    q, p = torch.randn(3, 6, 4), torch.randn(5, 8, 4)
    q_mask, p_mask = torch.ones(3, 6, dtype=torch.long), torch.ones(5, 8, dtype=torch.long)
    q_mask[0, 4:], p_mask[1, 3:] = 0, 0
    got = losses.m3_colbert_scores(q * q_mask[..., None], q_mask, p * p_mask[..., None], p_mask)
    for i in range(3):
        for j in range(5):
            expected = colbert_score(q[i][q_mask[i].bool()], p[j][p_mask[j].bool()])
            assert got[i, j].item() == pytest.approx(expected.item(), abs=1e-5)
    scores = torch.arange(24.0).view(2, 12)
    assert losses.own_group(scores, 6).tolist() == [[0, 1, 2, 3, 4, 5], [18, 19, 20, 21, 22, 23]]


def test_unified_finetuning_every_head_learns(tmp_path, m3_start, m3_train_file, texts):
    out = tmp_path / "m3"
    run(
        "finetune",
        "m3",
        "--model",
        str(m3_start),
        "--train-data",
        str(m3_train_file),
        "--output-dir",
        str(out),
        "--max-steps",
        "24",
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--query-max-len",
        "32",
        "--passage-max-len",
        "64",
        "--use-self-distill",
        "--logging-steps",
        "4",
    )
    history = _history(out)
    uniform = math.log(4 * 2)  # the loss of a head that scores every candidate alike
    for key in ("dense_loss", "sparse_loss", "colbert_loss", "ensemble_loss"):
        first, last = history[0][key], np.mean([h[key] for h in history[-2:]])
        assert last < first, f"{key} did not fall: {[h[key] for h in history]}"
    assert np.mean([h["sparse_loss"] for h in history[-2:]]) < uniform, "the sparse head must rank, not collapse"
    assert history[-1]["sparse_active"] > 0.5 and "self_distill_loss" in history[-1]

    before = BGEM3FlagModel(str(m3_start), use_fp16=False, devices="cpu")
    after = BGEM3FlagModel(str(out), use_fp16=False, devices="cpu")
    kwargs = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True}
    old, new = before.encode(texts["passages"], **kwargs), after.encode(texts["passages"], **kwargs)
    assert np.abs(old["dense_vecs"] - new["dense_vecs"]).max() > 1e-3
    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(old["colbert_vecs"], new["colbert_vecs"], strict=True))
    assert old["lexical_weights"] != new["lexical_weights"]
    assert all(new["lexical_weights"]), "every text keeps lexical weights"


def test_sparse_head_only_leaves_the_encoder_unchanged(tmp_path, m3_golden, m3_train_file):
    from transformers import AutoModel

    out = tmp_path / "sparse-only"
    run(
        "finetune",
        "m3",
        "--model",
        str(m3_golden),
        "--train-data",
        str(m3_train_file),
        "--output-dir",
        str(out),
        "--heads",
        "sparse",
        "--fix-encoder",
        "--max-steps",
        "16",
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "1e-2",
        "--query-max-len",
        "32",
        "--passage-max-len",
        "64",
        "--logging-steps",
        "4",
        "--query-instruction-for-retrieval",
        "query: ",
    )
    # loaded, not read from the files: transformers 5.0 saves LayerNorm weights as gamma / beta
    start = AutoModel.from_pretrained(str(m3_golden)).state_dict()
    end = AutoModel.from_pretrained(str(out)).state_dict()
    assert start.keys() == end.keys()
    assert all(torch.equal(start[k], end[k]) for k in start), "a fixed encoder must not move"
    load = lambda folder, name: torch.load(folder / name, weights_only=True)  # noqa: E731
    old_colbert, new_colbert = load(m3_golden, "colbert_linear.pt"), load(out, "colbert_linear.pt")
    assert all(torch.equal(old_colbert[k], new_colbert[k]) for k in old_colbert), "an untrained head must not move"
    old_sparse, new_sparse = load(m3_golden, "sparse_linear.pt"), load(out, "sparse_linear.pt")
    assert not torch.equal(old_sparse["weight"], new_sparse["weight"])
    history = _history(out)
    assert set(history[0]) >= {"sparse_loss", "sparse_active"} and "dense_loss" not in history[0]
    assert np.mean([h["sparse_loss"] for h in history[-2:]]) < history[0]["sparse_loss"]
    BGEM3FlagModel(str(out), devices="cpu").encode(["what is BGE?"], return_sparse=True)
    reloaded = Embedder.from_pretrained(str(out), devices="cpu")  # the trained prompt comes back
    assert isinstance(reloaded, BGEM3FlagModel) and reloaded.query_instruction_for_retrieval == "query: "


def test_fresh_heads_on_a_plain_encoder(tmp_path, tiny_xlmr, m3_train_file):
    from bgekit.train.m3 import M3Options, finetune_m3

    out = finetune_m3(
        M3Options(
            output_dir=str(tmp_path / "fresh"),
            model_name_or_path=str(tiny_xlmr),
            train_data=[str(m3_train_file)],
            max_steps=4,
            per_device_train_batch_size=4,
            query_max_len=16,
            passage_max_len=32,
            colbert_dim=16,
            learning_rate=1e-3,
            logging_steps=2,
        )
    )
    model = BGEM3FlagModel(str(out), devices="cpu")
    result = model.encode(["what is BGE?"], return_sparse=True, return_colbert_vecs=True)
    assert result["colbert_vecs"][0].shape[1] == 16
    assert len(result["lexical_weights"][0]) > 0, "a new sparse head starts with every token alive"


def test_fix_position_embedding_keeps_m3s_position_table(tmp_path, m3_start, m3_train_file):
    """As FlagEmbedding's M3 runner: fix_position_embedding freezes the encoder's position table only."""
    from transformers import AutoModel

    from bgekit.train.m3 import M3Options, finetune_m3

    out = finetune_m3(
        M3Options(
            output_dir=str(tmp_path / "fixed"),
            model_name_or_path=str(m3_start),
            train_data=[str(m3_train_file)],
            max_steps=2,
            per_device_train_batch_size=4,
            query_max_len=16,
            passage_max_len=32,
            learning_rate=1e-3,
            fix_position_embedding=True,
        )
    )
    start = AutoModel.from_pretrained(str(m3_start)).state_dict()
    end = AutoModel.from_pretrained(str(out)).state_dict()
    positions = [k for k in start if "position_embeddings" in k]
    assert positions and all(torch.equal(start[k], end[k]) for k in positions)
    assert not torch.equal(start["embeddings.word_embeddings.weight"], end["embeddings.word_embeddings.weight"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"heads": ["dense", "bm25"]}, "heads must be"),
        ({"heads": ["dense"], "fix_encoder": True}, "nothing to train"),
        ({"heads": ["sparse"], "use_self_distill": True}, "at least two heads"),
        ({"sentence_pooling_method": "mean"}, "must be 'cls'"),
        ({"matryoshka_dims": [16]}, "matryoshka_dims not supported"),
    ],
)
def test_bad_m3_options_fail_before_training(tmp_path, m3_golden, m3_train_file, options, message):
    from bgekit.train.m3 import M3Options, finetune_m3

    with pytest.raises(InputError, match=message):
        finetune_m3(
            M3Options(
                output_dir=str(tmp_path / "never"),
                model_name_or_path=str(m3_golden),
                train_data=[str(m3_train_file)],
                **options,
            )
        )
    assert not (tmp_path / "never").exists()
