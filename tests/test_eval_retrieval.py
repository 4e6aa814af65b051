"""The retrieval pipeline on the committed fixture with real models.

- the pipeline's numbers equal an independent computation (encode, numpy cosine, pytrec_eval);
- check 4: reranking reorders the top k, metrics are computed on the reranked list, and an
  identity-like reranker (the same embedder scoring pairs) leaves the metrics unchanged;
- check 5: a second run does no forward pass on the corpus, and a run interrupted (in process, and
  killed with SIGKILL as a subprocess) resumes from its cached chunks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval

from bgekit.eval.datasets import load_retrieval_dataset
from bgekit.eval.metrics import evaluate_run, ranked, read_trec_run
from bgekit.eval.retrieval import evaluate_retrieval

from .cli import BGEKIT

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "examples" / "data" / "scifact-mini"


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from bgekit import Embedder

    return Embedder.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="module")
def tiny(tiny_bert):
    """A 2-layer random BERT: fast, for the cache mechanics."""
    from bgekit import Embedder

    return Embedder.from_pretrained(str(tiny_bert))


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="module")
def dataset():
    return load_retrieval_dataset(MINI, "test")


class ForwardCounter:
    """Counts the rows that go through a model's forward (a real hook, not a stand-in). It watches
    the embeddings, which every forward path runs: a hook on the model itself would turn off the
    last layer's first-rows path (bgekit.runtime.first_tokens) and test another path than users run."""

    def __init__(self, module):
        self.rows = 0
        self.handle = module.embeddings.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        self.rows += int(ids.shape[0])

    def close(self):
        self.handle.remove()


def test_pipeline_equals_an_independent_computation(minilm, dataset, shared_cache, tmp_path):
    result = evaluate_retrieval(minilm, MINI, "test", cache_dir=shared_cache, output=tmp_path / "report.json")
    queries = list(dataset.queries)
    q = minilm.encode_queries([dataset.queries[i] for i in queries])
    d = minilm.encode_corpus(dataset.corpus_texts)
    scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
    run = {}
    for query_id, row in zip(queries, scores, strict=True):
        best = np.argsort(-row, kind="stable")[:100]
        run[query_id] = {dataset.corpus_ids[i]: float(row[i]) for i in best}
    cut = "1,3,5,10,100"
    theirs = pytrec_eval.RelevanceEvaluator(dataset.qrels, {f"ndcg_cut.{cut}", f"map_cut.{cut}", f"recall.{cut}"})
    per_query = theirs.evaluate(run)
    for name, key in (("ndcg_at_10", "ndcg_cut_10"), ("map_at_10", "map_cut_10"), ("recall_at_100", "recall_100")):
        expected = np.mean([v[key] for v in per_query.values()])
        assert result.metrics[name] == pytest.approx(expected, abs=1e-6), name
    assert 0.5 < result.metrics["ndcg_at_10"] < 1.0
    # the report: MTEB's key names, fractions, timings, run file
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"model", "dataset", "split", "metrics", "timings"} <= set(report)
    assert report["dataset"] == "scifact-mini" and report["split"] == "test"
    assert {"ndcg_at_10", "map_at_10", "recall_at_100", "mrr_at_10", "precision_at_10"} <= set(report["metrics"])
    assert all(0.0 <= v <= 1.0 for v in report["metrics"].values())
    assert report["timings"]["encode_corpus_s"] >= 0 and report["timings"]["total_s"] > 0
    assert "| nDCG |" in (tmp_path / "report.md").read_text()
    written = read_trec_run(tmp_path / "report.trec")
    assert set(written) == set(dataset.queries) and all(len(v) == 100 for v in written.values())
    assert not list(tmp_path.glob(".*tmp*"))


def test_rerank_changes_the_ranking_and_metrics_use_the_reranked_list(
    minilm, shared_cache, tiny_xlmr_reranker, dataset
):
    from bgekit import FlagReranker

    reranker = FlagReranker(str(tiny_xlmr_reranker))
    result = evaluate_retrieval(
        minilm, MINI, reranker=reranker, rerank_top_k=20, k_values=(1, 5, 10, 20), cache_dir=shared_cache
    )
    first, final = result.retrieval_run, result.run
    assert result.reranker == str(tiny_xlmr_reranker) and result.rerank_top_k == 20
    # the reranked list holds the first stage's top 20, scored by the reranker
    query_id = next(iter(dataset.queries))
    top20 = [d for d, _ in ranked(first[query_id])[:20]]
    assert set(final[query_id]) == set(top20)
    expected = reranker.compute_score([(dataset.queries[query_id], text_of(dataset, d)) for d in top20])
    np.testing.assert_allclose([final[query_id][d] for d in top20], expected, atol=1e-5)
    changed = sum([d for d, _ in ranked(final[q])] != [d for d, _ in ranked(first[q])[:20]] for q in dataset.queries)
    assert changed >= len(dataset.queries) // 2, "a random cross-encoder should reorder most queries"
    assert result.metrics == evaluate_run(dataset.qrels, final, (1, 5, 10, 20))
    assert result.retrieval_metrics == evaluate_run(dataset.qrels, first, (1, 5, 10, 20))
    assert result.metrics["ndcg_at_10"] != pytest.approx(result.retrieval_metrics["ndcg_at_10"])
    assert result.metrics["recall_at_20"] == pytest.approx(result.retrieval_metrics["recall_at_20"])  # same 20 docs


def text_of(dataset, doc_id):
    return dataset.corpus_texts[dataset.corpus_ids.index(doc_id)]


def test_rerank_with_several_layers_is_refused_before_any_work(golden_dir, tiny, dataset, tmp_path):
    """A layerwise reranker set to score several cutoff layers: one clear error (FlagEmbedding's evaluation
    fails on float() of a list; bgekit used the last layer without a word), before the corpus is embedded."""
    from bgekit import InputError, LayerWiseFlagLLMReranker
    from bgekit.eval.retrieval import rerank_run

    folder = str(golden_dir / "models" / "minicpm-layerwise")
    several = r"scores for 2 layers \(cutoff_layers=\[1, 2\]\); ranking needs one score a document"
    query_id = next(iter(dataset.queries))
    run = {query_id: {d: 1.0 / (i + 1) for i, d in enumerate(dataset.corpus_ids[:3])}}
    built = LayerWiseFlagLLMReranker(folder, devices="cpu", cutoff_layers=[1, 2])
    with pytest.raises(InputError, match=several):
        rerank_run(built, dataset, run, 3)
    with pytest.raises(InputError, match=several):
        evaluate_retrieval(tiny, MINI, reranker=built, cache_dir=tmp_path)
    with pytest.raises(InputError, match=several):
        evaluate_retrieval(tiny, MINI, reranker=folder, reranker_options={"cutoff_layers": [1, 2]}, cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.npy"))  # refused before the corpus was embedded
    one = LayerWiseFlagLLMReranker(folder, devices="cpu", cutoff_layers=[1])  # one layer: its scores
    reranked = rerank_run(one, dataset, run, 3)
    expected = one.compute_score([(dataset.queries[query_id], text_of(dataset, d)) for d in run[query_id]])
    np.testing.assert_allclose([reranked[query_id][d] for d in run[query_id]], expected, atol=1e-6)


def test_reranker_is_checked_before_any_model_loads(golden_dir, tmp_path):
    """A reranker that will be refused is said before the embedder loads (as `bgekit search` resolves its
    --reranker before the query model): here the embedder is a folder that does not exist, so an error
    about it would mean the embedder was loaded first."""
    from bgekit import InputError, ModelNotFoundError

    folder = str(golden_dir / "models" / "minicpm-layerwise")
    no_embedder, cache = str(tmp_path / "no-such-embedder"), tmp_path / "cache"
    several = r"scores for 2 layers \(cutoff_layers=\[1, 2\]\); ranking needs one score a document"
    with pytest.raises(InputError, match=several):
        evaluate_retrieval(
            no_embedder, MINI, reranker=folder, reranker_options={"cutoff_layers": [1, 2]}, cache_dir=cache
        )
    with pytest.raises(InputError, match="reranker must be a bgekit Reranker or a model name / folder, got int"):
        evaluate_retrieval(no_embedder, MINI, reranker=3, cache_dir=cache)
    with pytest.raises(ModelNotFoundError, match="no-such-reranker"):
        evaluate_retrieval(no_embedder, MINI, reranker=str(tmp_path / "no-such-reranker"), cache_dir=cache)
    with pytest.raises(ModelNotFoundError, match="no-such-embedder"):  # a reranker that resolves: the embedder's turn
        evaluate_retrieval(no_embedder, MINI, reranker=folder, cache_dir=cache)


def test_identity_like_reranker_leaves_metrics_unchanged(minilm, minilm_dir, shared_cache, dataset, caplog):
    from bgekit import Reranker

    with caplog.at_level("WARNING", logger="bgekit.models.reranker"):
        same_model = Reranker.from_pretrained(str(minilm_dir))  # scores pairs by the embedder's own cosine
    assert type(same_model).__name__ == "BiEncoderReranker"
    assert "is an embedding model" in caplog.text, "an embedder as reranker is said, not silent"
    result = evaluate_retrieval(
        minilm, MINI, reranker=same_model, rerank_top_k=5, k_values=(1, 3, 5), cache_dir=shared_cache
    )
    for query_id in dataset.queries:
        assert [d for d, _ in ranked(result.run[query_id])] == [
            d for d, _ in ranked(result.retrieval_run[query_id])[:5]
        ]
    for name, value in result.retrieval_metrics.items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-12), name


def test_second_run_does_no_forward_pass_on_the_corpus(tiny, dataset, tmp_path):
    counter = ForwardCounter(tiny.model)
    try:
        first = evaluate_retrieval(tiny, MINI, cache_dir=tmp_path)
        rows_first = counter.rows
        counter.rows = 0
        second = evaluate_retrieval(tiny, MINI, cache_dir=tmp_path)
        rows_second = counter.rows
    finally:
        counter.close()
    assert rows_first == len(dataset.corpus_ids) + len(dataset.queries)
    assert rows_second == len(dataset.queries), "the corpus must come from the cache"
    assert (first.cache["status"], second.cache["status"]) == ("miss", "hit")
    assert second.cache["embedded_documents"] == 0
    assert second.metrics == first.metrics
    # another model option (a different max length) is another cache entry
    third = evaluate_retrieval(tiny, MINI, cache_dir=tmp_path, max_length=64)
    assert third.cache["status"] == "miss" and third.cache["path"] != first.cache["path"]


def test_an_interrupted_run_resumes_from_its_chunks(tiny, dataset, tmp_path):
    class Interrupt(Exception):
        pass

    def stop_after_two(done, total):
        if done == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        evaluate_retrieval(tiny, MINI, cache_dir=tmp_path, chunk_size=40, on_chunk=stop_after_two)
    folder = next((tmp_path / "corpus").iterdir())
    assert sorted(p.name for p in folder.glob("chunk-*.npy")) == ["chunk-00000.npy", "chunk-00001.npy"]
    counter = ForwardCounter(tiny.model)
    try:
        resumed = evaluate_retrieval(tiny, MINI, cache_dir=tmp_path, chunk_size=40)
    finally:
        counter.close()
    assert resumed.cache["status"] == "resumed"
    assert (resumed.cache["cached_documents"], resumed.cache["embedded_documents"]) == (80, 77)
    assert counter.rows == 77 + len(dataset.queries)
    assert not list(folder.glob("chunk-*.npy")) and (folder / "embeddings.npy").exists()
    in_one_go = evaluate_retrieval(tiny, MINI, use_cache=False)
    assert in_one_go.cache["status"] == "off"
    np.testing.assert_allclose(np.load(folder / "embeddings.npy"), tiny.encode_corpus(dataset.corpus_texts), atol=1e-5)
    for query_id, docs in in_one_go.run.items():
        got = resumed.run[query_id]
        assert sorted(got.values()) == pytest.approx(sorted(docs.values()), abs=1e-5)
        # chunks batch the texts differently, which moves scores by float rounding (~2e-7 here), and the
        # random model's scores are nearly tied: documents within that of the cut-off may rank either way
        cutoff = min(docs.values()) + 1e-6
        assert {d: got.get(d) for d, v in docs.items() if v > cutoff} == pytest.approx(
            {d: v for d, v in docs.items() if v > cutoff}, abs=1e-5
        )


def test_a_killed_cli_run_resumes(tmp_path, minilm_dir):
    cache = tmp_path / "cache"
    args = [
        BGEKIT, "eval", "retrieval", "--model", str(minilm_dir), "--dataset", str(MINI),
        "--cache-dir", str(cache), "--chunk-size", "8", "--output", str(tmp_path / "out.json"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not list(cache.glob("corpus/*/chunk-00001.npy")):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no chunk written in time"
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "out.json").exists()
    done_before = len(list(cache.glob("corpus/*/chunk-*.npy")))
    assert 2 <= done_before < 20  # 157 documents in chunks of 8: killed part way
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["cache"]["status"] == "resumed"
    assert report["cache"]["cached_documents"] >= 8 * done_before - 7
    assert report["cache"]["cached_documents"] + report["cache"]["embedded_documents"] == 157
    assert 0.5 < report["metrics"]["ndcg_at_10"] < 1.0


def test_query_instruction_override(minilm, shared_cache):
    plain = evaluate_retrieval(minilm, MINI, cache_dir=shared_cache)
    prefixed = evaluate_retrieval(minilm, MINI, cache_dir=shared_cache, query_instruction="Represent this: ")
    assert prefixed.settings["query_instruction"] == "Represent this: "
    assert prefixed.cache["status"] == "hit"  # the corpus does not depend on the query instruction
    assert prefixed.metrics != plain.metrics


@pytest.mark.parametrize(("index", "quantization"), [("hnsw", None), ("flat", "int8")])
def test_approximate_search_stays_close(minilm, shared_cache, index, quantization):
    exact = evaluate_retrieval(minilm, MINI, cache_dir=shared_cache)
    approx = evaluate_retrieval(minilm, MINI, cache_dir=shared_cache, index=index, quantization=quantization)
    assert approx.metrics["ndcg_at_10"] == pytest.approx(exact.metrics["ndcg_at_10"], abs=0.02)


def test_identical_ids_are_skipped_before_the_cut(minilm, tmp_path):
    """ArguAna-style: the query is itself a corpus document. BEIR searches one deeper and drops it, so
    the deepest cutoff still sees k other documents (here the relevant one is second after it)."""
    docs = {
        "a1": "Cats are small furry pets that purr.",
        "a2": "Dogs are loyal animals that bark.",
        "a3": "Cats and kittens like to chase mice.",
        "a4": "Felines such as house cats sleep a lot.",
        "a5": "The stock market fell sharply today.",
        "a6": "Quantum computers use qubits.",
    }
    folder = tmp_path / "argu"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in docs.items()))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "a1", "text": docs["a1"]}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\na1\ta3\t1\n")
    full = evaluate_retrieval(minilm, folder, k_values=[5], ignore_identical_ids=True, use_cache=False)
    ranking = [doc for doc, _ in sorted(full.run["a1"].items(), key=lambda item: -item[1])]
    assert "a1" not in ranking and len(ranking) == 5
    k = ranking.index("a3") + 1  # the relevant document's rank among the others
    cut = evaluate_retrieval(
        minilm, folder, k_values=[k], ignore_identical_ids=True, use_cache=False, output=tmp_path / "out.json"
    )
    assert cut.metrics[f"recall_at_{k}"] == 1.0 and len(cut.run["a1"]) == k
    assert "a1" not in [line.split()[2] for line in (tmp_path / "out.trec").read_text().splitlines()]


def test_a_merged_lora_adapter_gets_its_own_cache_key(golden_dir, tmp_path, dataset):
    """FlagLLMModel(base, peft_path=...) reused the base model's cached corpus vectors."""
    import torch

    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from bgekit import FlagLLMModel
    from bgekit.eval.retrieval import cache_key

    base = str(golden_dir / "models" / "mistral-llm")
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(str(tmp_path / "adapter"))
    plain = cache_key(FlagLLMModel(base, devices="cpu"), dataset, None)
    tuned = FlagLLMModel(base, devices="cpu", peft_path=str(tmp_path / "adapter"))
    assert cache_key(tuned, dataset, None) != plain
    assert cache_key(FlagLLMModel(base, devices="cpu"), dataset, None) == plain


def test_weights_written_in_this_process_get_their_own_cache_entry(tiny_bert, dataset, tmp_path):
    """A model trained (or loaded into) in this process after loading: the corpus cache, keyed on the model's
    files, gave the old weights' vectors. Its key now carries a hash of the weights, only once they changed."""
    import copy
    import pickle

    import torch

    from bgekit import Embedder
    from bgekit.eval.retrieval import cache_key

    model = Embedder.from_pretrained(str(tiny_bert), devices="cpu")
    first = evaluate_retrieval(model, MINI, cache_dir=tmp_path)
    loaded_key = cache_key(model, dataset, None)
    assert cache_key(copy.deepcopy(model), dataset, None) == loaded_key  # copies of an unchanged model agree
    with torch.no_grad():  # as an optimizer step would: in place
        for parameter in model.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    changed_key = cache_key(model, dataset, None)
    assert changed_key != loaded_key
    second = evaluate_retrieval(model, MINI, cache_dir=tmp_path)
    assert (first.cache["status"], second.cache["status"]) == ("miss", "miss")
    assert second.metrics != first.metrics
    assert evaluate_retrieval(model, MINI, cache_dir=tmp_path).cache["status"] == "hit"  # the same new weights
    assert cache_key(pickle.loads(pickle.dumps(model)), dataset, None) == changed_key  # the mark travels
    assert cache_key(Embedder.from_pretrained(str(tiny_bert), devices="cpu"), dataset, None) == loaded_key


def test_other_weights_copied_in_with_size_and_time_kept_get_their_own_cache_entry(golden_dir, tmp_path):
    """The key held the weights files' names, sizes and modification times: another model of the same
    architecture copied over them with ``cp -p`` (same size, its time set to the old file's) reused the
    old model's cached vectors. The key now holds a sample of the weights' bytes too."""
    import os
    import shutil

    from bgekit import Embedder

    from .tiny_models import build_bert

    tokenizer = golden_dir / "models" / "bert-cls"
    model = build_bert(tmp_path / "model", tokenizer, seed=7)
    other = build_bert(tmp_path / "other", tokenizer, seed=8)
    weights, replacement = model / "model.safetensors", other / "model.safetensors"
    assert weights.stat().st_size == replacement.stat().st_size
    before = weights.stat()
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    first = evaluate_retrieval(Embedder.from_pretrained(str(model), devices="cpu"), MINI, cache_dir=tmp_path / "c")
    shutil.copy2(replacement, weights)  # cp -p
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = evaluate_retrieval(Embedder.from_pretrained(str(model), devices="cpu"), MINI, cache_dir=tmp_path / "c")
    assert (first.cache["status"], second.cache["status"]) == ("miss", "miss")
    assert second.cache["path"] != first.cache["path"] and second.metrics != first.metrics
    fresh = evaluate_retrieval(Embedder.from_pretrained(str(other), devices="cpu"), MINI, cache_dir=tmp_path / "d")
    assert second.metrics == fresh.metrics  # the vectors of the weights now in the folder


def test_query_instruction_override_keeps_the_models_query_path(golden_dir):
    """The override went through plain ``encode``: M3 crashed on its dict, ICL lost its prompt and examples."""
    from bgekit import BGEM3FlagModel, FlagICLModel
    from bgekit.eval.retrieval import encode_queries

    texts = ["what is a panda?", "bamboo"]
    m3_folder = str(golden_dir / "models" / "xlmr-m3")
    got = encode_queries(BGEM3FlagModel(m3_folder, devices="cpu"), texts, "query: ", None, None)
    expected = BGEM3FlagModel(m3_folder, query_instruction_for_retrieval="query: ", devices="cpu").encode_queries(texts)
    np.testing.assert_allclose(got, expected["dense_vecs"], atol=1e-6)

    icl_folder = str(golden_dir / "models" / "mistral-icl")
    examples = [{"query": "q", "response": "r"}]  # takes the default instruction
    options = {"examples_for_task": examples, "devices": "cpu"}
    model = FlagICLModel(icl_folder, query_instruction_for_retrieval="Old.", **options)
    got = encode_queries(model, texts, "New task.", None, None)
    fresh = FlagICLModel(icl_folder, query_instruction_for_retrieval="New task.", **options)
    np.testing.assert_allclose(got, fresh.encode_queries(texts), atol=1e-6)
    assert model.query_instruction_for_retrieval == "Old."  # the caller's model is unchanged


def test_save_removes_run_files_it_does_not_write(tmp_path):
    """A report whose run cannot go into a TREC file (an id with a space), or that has no first
    stage, left the previous report's run files beside it."""
    from bgekit.eval.retrieval import RetrievalResult

    def result(run, first=None):
        metrics = {"ndcg_at_10": 0.5}
        info = {"name": "d", "queries": 1, "documents": 2, "judgments": 1}
        return RetrievalResult("m", info, "test", metrics, [10], {}, run, metrics, first, "r", 10)

    result({"q": {"d1": 1.0}}, {"q": {"d1": 0.5}}).save(tmp_path / "r.json")
    assert (tmp_path / "r.trec").exists() and (tmp_path / "r.retrieval.trec").exists()
    files = result({"q": {"doc 4": 1.0}}).save(tmp_path / "r.json")
    assert not (tmp_path / "r.trec").exists() and not (tmp_path / "r.retrieval.trec").exists()
    assert set(files) == {"json", "markdown"}


def test_an_embedder_as_reranker_takes_reranker_instructions(minilm_dir):
    """query_instruction_for_rerank on an embedding model was warned about and dropped."""
    import warnings

    from bgekit import Embedder, Reranker

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ignores unknown options"
        reranker = Reranker.from_pretrained(str(minilm_dir), query_instruction_for_rerank="query: ", devices="cpu")
    embedder = Embedder.from_pretrained(str(minilm_dir), query_instruction_for_retrieval="query: ", devices="cpu")
    expected = embedder.encode_queries(["what is a panda"]) @ embedder.encode_corpus(["a bear"]).T
    assert reranker.compute_score([("what is a panda", "a bear")])[0] == pytest.approx(float(expected[0, 0]), abs=1e-6)


class _HashEmbedder:
    """A user's own embedder: vectors from a seeded hash of the words, no model folder."""

    def __init__(self, seed: int, model_name_or_path: str = ""):
        self.seed, self.model_name_or_path = seed, model_name_or_path

    def _encode(self, texts, **_):
        rows = []
        for text in [texts] if isinstance(texts, str) else texts:
            vector = np.zeros(16, dtype=np.float32)
            for word in text.lower().split():
                vector[hash((self.seed, word)) % 16] += 1.0
            rows.append(vector / max(np.linalg.norm(vector), 1e-9))
        return np.stack(rows)

    encode_queries = encode_corpus = _encode


def test_a_custom_embedder_without_a_model_folder_is_not_cached(tmp_path, minilm_dir):
    first = evaluate_retrieval(_HashEmbedder(1), MINI, cache_dir=tmp_path)
    other = evaluate_retrieval(_HashEmbedder(2), MINI, cache_dir=tmp_path)
    assert first.cache["status"] == other.cache["status"] == "off" and not (tmp_path / "corpus").exists()
    assert other.metrics != first.metrics  # another instance's vectors, not the first one's from a cache
    named = evaluate_retrieval(_HashEmbedder(1, str(minilm_dir)), MINI, cache_dir=tmp_path)
    again = evaluate_retrieval(_HashEmbedder(1, str(minilm_dir)), MINI, cache_dir=tmp_path)
    assert (named.cache["status"], again.cache["status"]) == ("miss", "hit") and again.metrics == first.metrics


def test_an_onnx_export_of_replaced_weights_gets_its_own_cache_key(tiny_bert, dataset, tmp_path, monkeypatch):
    """The key said only backend "onnx": weights replaced in place with their size and modification time
    kept (``cp -p``, ``rsync -a``) were exported again, yet the cache gave the old export's vectors."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from bgekit import Embedder
    from bgekit.eval.retrieval import cache_key

    monkeypatch.setenv("BGEKIT_CACHE", str(tmp_path / "cache"))
    folder = shutil.copytree(tiny_bert, tmp_path / "model")
    old = cache_key(Embedder.from_pretrained(str(folder), devices="cpu", backend="onnx"), dataset, None)
    weights = folder / "model.safetensors"
    before = weights.stat()
    torch.manual_seed(0)
    tensors = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in load_file(weights).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size
    new = cache_key(Embedder.from_pretrained(str(folder), devices="cpu", backend="onnx"), dataset, None)
    assert new != old
    assert cache_key(Embedder.from_pretrained(str(folder), devices="cpu", backend="onnx"), dataset, None) == new
