"""FlagEmbedding 1.4.2's per-device and pool methods, its abstract bases and FlagPseudoMoEModel.

FlagEmbedding code calls ``encode_single_device`` / ``compute_score_single_gpu`` directly, builds
process pools, and subclasses ``AbsEmbedder`` / ``AbsReranker`` for its own models; these checks
run that code against bgekit on tiny real models."""

from __future__ import annotations

import json
import pickle
import shutil
import threading

import numpy as np
import pytest
import torch

from bgekit import (
    AbsEmbedder,
    AbsReranker,
    BGEM3FlagModel,
    EmbedderModelClass,
    FlagAutoModel,
    FlagICLModel,
    FlagModel,
    FlagPseudoMoEModel,
    FlagReranker,
    InputError,
)
from bgekit.runtime.devices import ReplicaPool

TEXTS = ["what is a panda?", "The giant panda is a bear native to China.", "bamboo", "a b c d e f g"]
PAIRS = [("what is a panda?", "The giant panda is a bear."), ("bamboo", "Pandas eat bamboo shoots all day.")]


def models(golden_dir, name: str) -> str:
    return str(golden_dir / "models" / name)


def test_pool_pins_one_thread_to_one_device():
    pool = ReplicaPool(torch.nn.Linear(2, 2), ["cpu", "cpu:1"], lambda device: torch.float32)
    seen: list[list[str]] = []
    with pool.only("cpu:1"):
        assert pool.devices == ["cpu:1"]
        other = threading.Thread(target=lambda: seen.append(pool.devices))
        other.start()
        other.join()
    assert seen == [["cpu", "cpu:1"]]  # other threads keep every device
    assert pool.devices == ["cpu", "cpu:1"]
    with pytest.raises(InputError, match="not one of this model's devices"), pool.only("cpu:7"):
        pass


def test_embedder_single_device_and_pool_methods(golden_dir):
    model = FlagModel(models(golden_dir, "bert-cls"), query_instruction_for_retrieval="Q: ", devices=["cpu", "cpu"])
    whole = model.encode(TEXTS)
    np.testing.assert_allclose(model.encode_single_device(TEXTS, device="cpu"), whole, rtol=0, atol=1e-6)
    assert model.encode_single_device(TEXTS[0]).shape == whole[0].shape  # no instruction, one vector
    tensor = model.encode_single_device(TEXTS, convert_to_numpy=False, device="cpu")
    assert isinstance(tensor, torch.Tensor)
    with pytest.raises(InputError, match="not one of this model's devices"):
        model.encode_single_device(TEXTS, device="cpu:3")
    pool = model.start_multi_process_pool()
    assert pool["processes"] == [] and pool["devices"] == ["cpu", "cpu"]
    np.testing.assert_allclose(model.encode_multi_process(TEXTS, pool, batch_size=2), whole, rtol=0, atol=1e-6)
    model.stop_multi_process_pool(pool)
    assert model.get_target_devices("cpu") == ["cpu"]
    assert model.get_model_torch_dtype() is torch.float32  # use_fp16=True runs float32 on the CPU
    bf16 = FlagModel(models(golden_dir, "bert-cls"), use_bf16=True, devices="cpu")
    assert bf16.get_model_torch_dtype() is torch.bfloat16


def test_m3_and_icl_single_device_methods(golden_dir):
    m3 = BGEM3FlagModel(models(golden_dir, "xlmr-m3"), devices="cpu")
    one = m3.encode_single_device(TEXTS, 2, 64, True, True, False, "cpu")
    whole = m3.encode(TEXTS, 2, 64, return_sparse=True)
    np.testing.assert_allclose(one["dense_vecs"], whole["dense_vecs"], rtol=0, atol=1e-6)
    assert one["lexical_weights"] == whole["lexical_weights"] and one["colbert_vecs"] is None
    scores = m3.compute_score_single_device(PAIRS, device="cpu")
    for mode, values in m3.compute_score(PAIRS).items():
        np.testing.assert_allclose(scores[mode], values, rtol=0, atol=1e-6)

    examples = [{"instruct": "Find it.", "query": "q", "response": "r"}]
    icl = FlagICLModel(models(golden_dir, "mistral-icl"), examples_for_task=examples, devices="cpu")
    np.testing.assert_allclose(
        icl.encode_queries_single_device(TEXTS, device="cpu"),
        icl.encode_queries(TEXTS, max_length=512),
        rtol=0,
        atol=1e-6,
    )


def test_reranker_single_gpu_and_pool_methods(golden_dir):
    reranker = FlagReranker(models(golden_dir, "xlmr-reranker"), query_instruction_for_rerank="Q: ", devices="cpu")
    detailed = reranker.get_detailed_inputs(PAIRS)
    assert detailed[0] == ["Q: what is a panda?", "The giant panda is a bear."]
    expected = reranker.compute_score(PAIRS)
    np.testing.assert_allclose(reranker.compute_score_single_gpu(detailed, device="cpu"), expected, atol=1e-6)
    normalized = reranker.compute_score_single_gpu(detailed, normalize=True)
    np.testing.assert_allclose(normalized, 1 / (1 + np.exp(-np.asarray(expected))), atol=1e-6)
    scores = reranker.encode_multi_process(detailed, reranker.start_multi_process_pool())
    assert isinstance(scores, np.ndarray)
    np.testing.assert_allclose(scores, expected, atol=1e-6)


class CharCounts(AbsEmbedder):
    """A FlagEmbedding-style custom embedder: only ``encode_single_device`` is written."""

    def encode_single_device(self, sentences, batch_size=256, max_length=512, convert_to_numpy=True, device=None):
        self.calls.append((threading.current_thread().name, device, list(sentences)))
        one = isinstance(sentences, str)
        rows = np.array([[len(s), s.count(" ")] for s in ([sentences] if one else sentences)], dtype="float32")
        rows = rows[0] if one else rows
        return rows if convert_to_numpy else torch.from_numpy(rows)


class LengthGap(AbsReranker):
    def compute_score_single_gpu(self, sentence_pairs, batch_size=256, query_max_length=None, max_length=512,
                                 normalize=False, device=None, **kwargs):  # fmt: skip
        return [float(len(p) - len(q)) for q, p in sentence_pairs]


def test_abs_embedder_subclass_runs_as_in_flagembedding():
    model = CharCounts(
        "none",
        query_instruction_for_retrieval="Q",
        query_instruction_format="{}\\n{}",
        devices=["cpu", "cpu"],
        passage_instruction_for_retrieval="P: ",
        calls=[],  # an unknown option becomes an attribute, as in FlagEmbedding
    )
    queries = model.encode_queries(TEXTS)
    np.testing.assert_array_equal(queries[:, 0], [len(t) + 2 for t in TEXTS])  # "Q\n" in front
    assert [call[1] for call in model.calls] == ["cpu", "cpu"]  # one chunk per device
    assert model.calls[0][2] == ["Q\nwhat is a panda?", "Q\nThe giant panda is a bear native to China."]
    corpus = model.encode_corpus(TEXTS, convert_to_numpy=False)
    assert isinstance(corpus, torch.Tensor)
    np.testing.assert_array_equal(corpus[:, 0].numpy(), [len(t) + 3 for t in TEXTS])
    assert model.encode("one two").tolist() == [7.0, 1.0]
    np.testing.assert_array_equal(model.encode_queries(TEXTS, instruction=None), model.encode(TEXTS))  # per call
    np.testing.assert_array_equal(model.encode_corpus(TEXTS, instruction="ab")[:, 0], [len(t) + 2 for t in TEXTS])
    with pytest.raises(InputError, match="sentences is empty"):
        model.encode([])
    with pytest.raises(TypeError, match="abstract"):
        AbsEmbedder("none")


def test_abs_reranker_subclass_runs_as_in_flagembedding():
    reranker = LengthGap("none", query_instruction_for_rerank="Q: ", devices=["cpu", "cpu", "cpu"])
    assert reranker.get_detailed_inputs(("q", "pp")) == [["Q: q", "pp"]]
    scores = reranker.compute_score(PAIRS)
    assert isinstance(scores, np.ndarray)
    np.testing.assert_array_equal(scores, [len(p) - len(q) - 3 for q, p in PAIRS])
    assert LengthGap("none", devices="cpu").compute_score(("ab", "abcd")) == [2.0]


def test_abs_subclasses_check_instruction_formats_when_built():
    with pytest.raises(InputError, match=r"query_instruction_format must have 2 \{\} slots .*3 field"):
        CharCounts("none", devices="cpu", query_instruction_format="{}{}{}", calls=[])
    with pytest.raises(InputError, match="passage_instruction_format must have 2"):
        LengthGap("none", devices="cpu", passage_instruction_format="{passage}")
    model = CharCounts(
        "none", devices="cpu", query_instruction_format=None, query_instruction_for_retrieval="Q", calls=[]
    )
    assert model.encode_queries(["ab"]).tolist() == [[3.0, 0.0]]  # None: FlagEmbedding's default "{}{}"


PSEUDO_MOE_CODE = '''
import torch
from transformers import MistralConfig, MistralModel


class PseudoMoEConfig(MistralConfig):
    model_type = "bgekit_test_pseudo_moe"


class PseudoMoEModel(MistralModel):
    """Mistral whose hidden states move by a per-domain offset: enough to see routing."""

    config_class = PseudoMoEConfig
    OFFSETS = {"general": 0.0, "coding": 1.0, "reasoning": -2.0}

    def __init__(self, config):
        super().__init__(config)
        self.active_domain = "general"
        self.set_domain_calls = 0

    def set_domain(self, domain):
        self.active_domain = domain
        self.set_domain_calls += 1

    def forward(self, *args, domain=None, **kwargs):
        out = super().forward(*args, **kwargs)
        offset = self.OFFSETS[domain or self.active_domain]
        steps = torch.arange(out.last_hidden_state.shape[-1], dtype=out.last_hidden_state.dtype)
        out.last_hidden_state = out.last_hidden_state + offset * steps
        return out
'''


@pytest.fixture(scope="module")
def pseudo_moe_dir(golden_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pseudo") / "tiny-pseudo-moe"
    shutil.copytree(golden_dir / "models" / "mistral-llm", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="bgekit_test_pseudo_moe",
        architectures=["PseudoMoEModel"],
        auto_map={
            "AutoConfig": "modeling_pseudo_moe.PseudoMoEConfig",
            "AutoModel": "modeling_pseudo_moe.PseudoMoEModel",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_pseudo_moe.py").write_text(PSEUDO_MOE_CODE)
    return folder


def _by_hand(folder, texts, domain):
    """Last-token pooling of the checkpoint's own forward with ``domain``, normalized."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    module = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            inputs = tokenizer([text], return_tensors="pt")
            rows.append(module(**inputs, domain=domain).last_hidden_state[0, -1])
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1).numpy()


def test_pseudo_moe_routes_by_domain(pseudo_moe_dir):
    model = FlagPseudoMoEModel(str(pseudo_moe_dir), domain_for_pseudo_moe="coding", devices="cpu", batch_size=2)
    assert model.get_model_torch_dtype() is torch.float32  # use_bf16=None: float32 on the CPU
    assert not model.host.packed
    coding = model.encode_corpus(TEXTS)
    np.testing.assert_allclose(coding, _by_hand(pseudo_moe_dir, TEXTS, "coding"), rtol=0, atol=1e-5)
    reasoning = model.encode_corpus(TEXTS, domain="reasoning")
    np.testing.assert_allclose(reasoning, _by_hand(pseudo_moe_dir, TEXTS, "reasoning"), rtol=0, atol=1e-5)
    np.testing.assert_allclose(model.encode(TEXTS, domain_for_pseudo_moe="general"),
                               _by_hand(pseudo_moe_dir, TEXTS, "general"), rtol=0, atol=1e-5)  # fmt: skip
    assert model.model.set_domain_calls > 0 and model._domain == "coding"  # back to the constructor's
    np.testing.assert_allclose(model.encode_corpus(TEXTS), coding, rtol=0, atol=1e-6)

    auto = FlagAutoModel.from_finetuned(
        str(pseudo_moe_dir),
        model_class=EmbedderModelClass.DECODER_ONLY_PSEUDO_MOE,
        trust_remote_code=True,
        devices="cpu",
        domain_for_pseudo_moe="reasoning",
    )
    assert isinstance(auto, FlagPseudoMoEModel)
    np.testing.assert_allclose(pickle.loads(pickle.dumps(auto)).encode_corpus(TEXTS), reasoning, rtol=0, atol=1e-5)
    np.testing.assert_allclose(auto.encode_corpus(TEXTS), reasoning, rtol=0, atol=1e-5)


def test_finetune_refuses_pseudo_moe(golden_dir, tmp_path):
    from bgekit.train.embedder import EmbedderOptions, finetune_embedder

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n")
    options = EmbedderOptions(
        model_name_or_path=models(golden_dir, "mistral-llm"),
        model_class="decoder-only-pseudo_moe",
        train_data=[str(data)],
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(InputError, match="pseudo-MoE"):
        finetune_embedder(options)
    assert not (tmp_path / "out").exists()


class StrictCounts(AbsEmbedder):
    """Written as FlagEmbedding's own embedders are: no **kwargs beyond its own, and its helpers."""

    def encode_single_device(self, sentences, batch_size=256, max_length=512, convert_to_numpy=True, device=None):
        one = isinstance(sentences, str)
        rows = torch.tensor([[len(s), s.count(" ") + 1.0] for s in ([sentences] if one else sentences)])
        rows = self._truncate_embeddings(torch.nn.functional.normalize(rows, dim=-1))
        rows = self._convert_to_numpy(rows) if convert_to_numpy else rows
        return rows[0] if one else rows


class NumpyGap(AbsReranker):
    def compute_score_single_gpu(self, sentence_pairs, batch_size=256, query_max_length=None, max_length=512,
                                 normalize=False, device=None):  # fmt: skip
        return np.array([-abs(len(p) - 3 * len(q)) for q, p in sentence_pairs], dtype=np.float32)


def test_flagembedding_style_models_run_through_bgekit_eval():
    """bgekit's evaluation passed show_progress_bar on to the subclass (FlagEmbedding's code hands
    extra options to its tokenizer, which refused it) and could not read a numpy array of scores."""
    from pathlib import Path

    from bgekit.eval.retrieval import evaluate_retrieval

    mini = Path(__file__).resolve().parents[1] / "examples" / "data" / "scifact-mini"
    embedder = StrictCounts("none", devices=["cpu", "cpu"])
    reranker = NumpyGap("none", devices=["cpu", "cpu"])
    result = evaluate_retrieval(embedder, mini, reranker=reranker, rerank_top_k=5, k_values=[5], use_cache=False)
    assert 0.0 <= result.metrics["ndcg_at_5"] <= 1.0 and result.retrieval_metrics is not None
    assert all(len(docs) <= 5 for docs in result.run.values())
    assert StrictCounts("none", truncate_dim=1).encode(["a b"]).shape == (1, 1)  # FlagEmbedding's helpers


def test_llm_rerankers_take_flagembeddings_positional_order(golden_dir):
    """Their single-GPU methods put prompt (and layers, compression) fifth: it landed in ``normalize``."""
    from bgekit import FlagLLMReranker, LayerWiseFlagLLMReranker, LightWeightFlagLLMReranker

    models = golden_dir / "models"
    prompt = "Is B an answer to A? Yes or No."
    llm = FlagLLMReranker(str(models / "gemma-llm-reranker"), use_fp16=False, devices="cpu")
    detailed = llm.get_detailed_inputs(PAIRS)  # the instructions (A: / B:) are compute_score's to add
    assert llm.compute_score_single_gpu(detailed, 8, None, 512, prompt) == llm.compute_score(PAIRS, prompt=prompt)
    layerwise = LayerWiseFlagLLMReranker(str(models / "minicpm-layerwise"), use_fp16=False, devices="cpu")
    assert layerwise.compute_score_single_gpu(layerwise.get_detailed_inputs(PAIRS), 8, None, 512, [1]) == (
        layerwise.compute_score(PAIRS, cutoff_layers=[1])
    )
    light = LightWeightFlagLLMReranker(str(models / "gemma2-lightweight"), use_fp16=False, devices="cpu")
    got = light.compute_score_single_gpu(light.get_detailed_inputs(PAIRS), 8, None, 512, [1], None, [1], 2)
    assert got == light.compute_score(PAIRS, cutoff_layers=[1], compress_layers=[1], compress_ratio=2)
    np.testing.assert_allclose(
        pickle.loads(pickle.dumps(light)).compute_score(PAIRS), light.compute_score(PAIRS), atol=1e-6
    )


def test_single_device_names_as_torch_spells_them(golden_dir):
    model = FlagModel(models(golden_dir, "bert-cls"), devices="cpu")
    expected = model.encode(TEXTS)
    for device in ("cpu:0", torch.device("cpu")):
        np.testing.assert_allclose(model.encode_single_device(TEXTS, device=device), expected, atol=1e-6)
