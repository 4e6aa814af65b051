"""Check 4: bad input gives a clear bgekit error, never a traceback from torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bgekit import (
    Embedder,
    FlagAutoModel,
    FlagAutoReranker,
    FlagModel,
    FlagReranker,
    InputError,
    ModelNotFoundError,
    Reranker,
    UnknownModelError,
)


@pytest.fixture(scope="module")
def embedder(tiny_bert):
    return FlagModel(str(tiny_bert), devices="cpu")


@pytest.fixture(scope="module")
def reranker(tiny_xlmr_reranker):
    return FlagReranker(str(tiny_xlmr_reranker), devices="cpu")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "sentences is None"),
        ([], "sentences is empty"),
        (["ok", None], r"sentences\[1\] is NoneType"),
        (["ok", 3], r"sentences\[1\] is int"),
        (b"bytes", "decode it"),
        (42, "must be a string or a list"),
        (["ok", "half \ud800 a pair"], r"text 1 is not valid Unicode: a lone surrogate '\\ud800' at character 5"),
        ({"id1": "text one"}, "is a dict, which iterates over its keys"),
        ({"a", "b"}, "is a set, which has no order"),
    ],
)
def test_encode_rejects(embedder, value, message):
    for method in (embedder.encode, embedder.encode_queries, embedder.encode_corpus):
        with pytest.raises(InputError, match=message):
            method(value)


def test_encode_rejects_bad_options(embedder):
    with pytest.raises(InputError, match="batch_size must be a positive int"):
        embedder.encode(["x"], batch_size=0)
    with pytest.raises(InputError, match="max_length must be a positive int"):
        embedder.encode(["x"], max_length=-3)
    with pytest.raises(InputError, match="no room for text"):
        embedder.encode(["x"], max_length=2)
    with pytest.raises(InputError, match="unexpected options"):
        embedder.encode(["x"], max_lenght=10)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "sentence_pairs is None"),
        ([], "sentence_pairs is empty"),
        ("just a string", "single string"),
        ([("q", "p"), ("only one",)], r"sentence_pairs\[1\] must be a \(query, passage\) pair"),
        ([("q", None)], r"sentence_pairs\[0\] passage is NoneType"),
        ([(1, "p")], r"sentence_pairs\[0\] query is int"),
        (("q", None), r"one \(query, passage\) pair whose passage is NoneType"),
        (["q", "p", "r"], "read as one \\(query, passage\\) pair, but it has 3 items"),
        (["q"], "read as one \\(query, passage\\) pair, but it has 1 items"),
        ([("q", "p"), ("q", "\udfff")], "text 1 is not valid Unicode"),
        ({"q": "p"}, "is a dict, which iterates over its keys"),
    ],
)
def test_compute_score_rejects(reranker, value, message):
    with pytest.raises(InputError, match=message):
        reranker.compute_score(value)


def test_compute_score_names_the_length_option(reranker):
    with pytest.raises(InputError, match="query_max_length must be a positive int, got 0"):
        reranker.compute_score([("q", "p")], query_max_length=0)
    with pytest.raises(InputError, match=r"^max_length must be a positive int, got 0"):
        reranker.compute_score([("q", "p")], max_length=0)


def test_unknown_model_name():
    with pytest.raises(UnknownModelError, match=r"does not know the embedder 'nobody/no-such-model'.*model_class="):
        Embedder.from_pretrained("nobody/no-such-model")
    with pytest.raises(UnknownModelError, match="reranker"):
        Reranker.from_pretrained("nobody/no-such-reranker")
    with pytest.raises(UnknownModelError, match="model_class must be one of"):
        FlagAutoModel.from_finetuned("BAAI/bge-base-en-v1.5", model_class="encoder-only-bogus")


def test_missing_folder(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    for build in (FlagModel, FlagReranker):
        with pytest.raises(ModelNotFoundError, match="does not exist"):
            build(str(missing))
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        FlagModel(str(tmp_path))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        FlagModel(str(tmp_path / "file.txt"))


def test_hub_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"could not get model 'BAAI/bge-base-en-v1.5'.*Offline"):
        FlagModel("BAAI/bge-base-en-v1.5")
    with pytest.raises(ModelNotFoundError):
        FlagAutoReranker.from_finetuned("BAAI/bge-reranker-base")


def test_bad_constructor_options(tiny_bert):
    with pytest.raises(InputError, match="pooling_method must be one of"):
        FlagModel(str(tiny_bert), pooling_method="max")
    with pytest.raises(InputError, match="not a device torch knows"):
        FlagModel(str(tiny_bert), devices="gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            FlagModel(str(tiny_bert), devices="cuda:3")
    with pytest.raises(InputError, match="truncate_dim"):
        FlagModel(str(tiny_bert), truncate_dim=0)
    with pytest.warns(UserWarning, match="ignores unknown options"):
        FlagModel(str(tiny_bert), devices="cpu", some_typo=1)


def test_multi_label_classifier_is_not_a_reranker(tmp_path, golden_dir):
    from .tiny_models import build_bert

    folder = build_bert(tmp_path / "nli", golden_dir / "models" / "bert-cls", reranker=True, num_labels=3)
    with pytest.raises(InputError, match="3 output labels"):
        FlagReranker(str(folder))


def test_corrupt_weights_are_a_clear_error(tmp_path, tiny_bert):
    import shutil

    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_bert, folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelNotFoundError, match="could not load model weights"):
        FlagModel(str(folder))


def test_dataframes_are_refused_but_their_columns_and_values_work(embedder, reranker):
    """A DataFrame iterates its column names: taken as texts, it silently embedded "query" and "passage"."""
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"query": ["what is a panda?", "bamboo"], "passage": ["A bear.", "A grass."]})
    with pytest.raises(InputError, match="DataFrame, which iterates over its column names"):
        embedder.encode(frame)
    with pytest.raises(InputError, match="DataFrame"):
        reranker.compute_score(frame)
    assert embedder.encode(frame["query"]).shape[0] == 2
    assert len(reranker.compute_score(frame[["query", "passage"]].values)) == 2
    assert embedder.encode(["x", "y"], batch_size=np.int64(1), max_length=np.int64(8)).shape[0] == 2  # numpy ints


def test_sentence_transformers_modules_bgekit_does_not_run_are_refused(tmp_path, minilm_dir):
    """A Dense layer after pooling (LaBSE, distiluse...) was silently skipped: 384 numbers where
    sentence-transformers gives 16."""
    st = pytest.importorskip("sentence_transformers")
    base = st.SentenceTransformer(str(minilm_dir), device="cpu")
    dense = st.models.Dense(384, 16, activation_function=torch.nn.Tanh())
    st.SentenceTransformer(modules=[base[0], base[1], dense, st.models.Normalize()], device="cpu").save(
        str(tmp_path / "dense")
    )
    with pytest.raises(UnknownModelError, match=r"modules bgekit does not run \(Dense\)"):
        Embedder.from_pretrained(str(tmp_path / "dense"))
    max_pooling = st.models.Pooling(384, pooling_mode="max")  # was read as cls, with a log line
    st.SentenceTransformer(modules=[base[0], max_pooling], device="cpu").save(str(tmp_path / "max"))
    with pytest.raises(UnknownModelError, match=r"does not run \(Pooling \(max_tokens\)\)"):
        Embedder.from_pretrained(str(tmp_path / "max"))
    plain = FlagModel(str(tmp_path / "dense"), pooling_method="mean", devices="cpu")  # the pooled output alone
    assert plain.encode("x").shape == (384,)
    assert Embedder.from_pretrained(str(minilm_dir)).encode("x").shape == (384,)  # Transformer, Pooling, Normalize


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("{}{}{}", r"2 \{\} slots \(instruction, text\).*3 field"),  # was an IndexError while encoding
        ("{}", r"1 field"),  # was silently dropping the query
        ("{query}: {}", "a named field {query}"),  # was a KeyError
        ("<instruct>{}\n<query>{", "Single '{'"),  # was a ValueError from str.format
        ("{0}{2}", "2 field"),
        (None, "be a string with 2"),
    ],
)
def test_bad_instruction_formats_are_clear_errors(golden_dir, tiny_bert, tiny_xlmr_reranker, fmt, message):
    with pytest.raises(InputError, match=rf"query_instruction_format must .*{message}"):
        FlagModel(str(tiny_bert), devices="cpu", query_instruction_for_retrieval="Find: ", query_instruction_format=fmt)
    with pytest.raises(InputError, match=rf"passage_instruction_format must .*{message}"):
        FlagReranker(str(tiny_xlmr_reranker), devices="cpu", passage_instruction_format=fmt)
    if fmt is not None:  # None in a call means the default format
        embedder = FlagModel(str(tiny_bert), devices="cpu")
        with pytest.raises(InputError, match=message):
            embedder.encode(["x"], instruction="Find: ", instruction_format=fmt)
        with pytest.raises(InputError, match=message):
            FlagModel.get_detailed_instruct(fmt, "Find: ", "x")


def test_icl_examples_format_needs_three_slots(golden_dir):
    from bgekit import FlagICLModel

    folder = str(golden_dir / "models" / "mistral-icl")
    with pytest.raises(InputError, match=r"examples_instruction_format must have 3 \{\} slots.*2 field"):
        FlagICLModel(folder, devices="cpu", examples_instruction_format="{}{}")  # would drop every response


@pytest.mark.parametrize("fmt", ["<instruct>{}\\n<query>{}", "{0} {1}", "{1} (asked: {0})", "{{literal}} {}{}"])
def test_good_instruction_formats_are_used_as_written(tiny_bert, fmt):
    model = FlagModel(
        str(tiny_bert), devices="cpu", query_instruction_for_retrieval="Find: ", query_instruction_format=fmt
    )
    want = fmt.replace("\\n", "\n").format("Find: ", "what is BGE?")
    expected = FlagModel(str(tiny_bert), devices="cpu").encode([want])
    np.testing.assert_allclose(model.encode_queries(["what is BGE?"]), expected, atol=1e-6)
