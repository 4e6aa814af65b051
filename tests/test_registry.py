"""The family table and model resolution: full names, short names, local folders, overrides."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bgekit import Embedder, FlagAutoModel, FlagAutoReranker, FlagModel, FlagReranker, Reranker, registry
from bgekit.errors import ModelNotFoundError
from bgekit.hub import describe_folder, model_folder, resolve


def test_lookup_full_ids_case_insensitive_and_unique_short_names():
    assert registry.lookup("BAAI/bge-base-en-v1.5", registry.EMBEDDERS)[0] == "BAAI/bge-base-en-v1.5"
    assert registry.lookup("baai/BGE-BASE-EN-V1.5", registry.EMBEDDERS)[0] == "BAAI/bge-base-en-v1.5"
    assert registry.lookup("bge-m3", registry.EMBEDDERS)[1].kind == registry.M3
    assert registry.lookup("jinaai/jina-reranker-v2-base-multilingual", registry.RERANKERS) is not None
    assert registry.lookup("someone-else/bge-base-en-v1.5", registry.EMBEDDERS) is None
    assert registry.lookup("bge-base-en-v1.5-finetuned", registry.EMBEDDERS) is None


def test_every_flagembedding_encoder_family_is_known():
    for name in (
        "bge-large-en-v1.5",
        "bge-small-zh-v1.5",
        "bge-base-en",
        "e5-large-v2",
        "multilingual-e5-base",
        "gte-base",
        "gte-large-zh",
        "bce-embedding-base_v1",
        "bge-en-icl",
        "e5-mistral-7b-instruct",
    ):
        assert registry.lookup(name, registry.EMBEDDERS) is not None, name
    for name in (
        "bge-reranker-base",
        "bge-reranker-large",
        "bge-reranker-v2-m3",
        "bge-reranker-v2-gemma",
        "bge-reranker-v2-minicpm-layerwise",
        "bge-reranker-v2.5-gemma2-lightweight",
    ):
        assert registry.lookup(name, registry.RERANKERS) is not None, name


def test_registry_values_are_consistent():
    for name, spec in {**registry.EMBEDDERS, **registry.RERANKERS}.items():
        assert "/" in name
        assert spec.pooling_method in (None, *registry.POOLING_METHODS)
        assert spec.query_instruction_format.count("{}") == 2


def test_local_folders_are_read_from_their_files(golden_dir, minilm_dir):
    bert = describe_folder(golden_dir / "models" / "bert-cls", registry.EMBEDDERS)
    assert (bert.kind, bert.pooling_method) == (registry.ENCODER, "cls")
    minilm = describe_folder(minilm_dir, registry.EMBEDDERS)
    assert (minilm.pooling_method, minilm.max_length) == ("mean", 256)
    assert describe_folder(golden_dir / "models" / "xlmr-m3", registry.EMBEDDERS).kind == registry.M3
    assert describe_folder(golden_dir / "models" / "mistral-llm", registry.EMBEDDERS).kind == registry.DECODER
    rerankers = {
        "xlmr-reranker": registry.CROSS_ENCODER,
        "gemma-llm-reranker": registry.LLM_RERANKER,
        "minicpm-layerwise": registry.LAYERWISE_RERANKER,
        "gemma2-lightweight": registry.LIGHTWEIGHT_RERANKER,
    }
    for family, kind in rerankers.items():
        assert describe_folder(golden_dir / "models" / family, registry.RERANKERS, for_reranker=True).kind == kind


def test_hub_cache_layout_names_the_model(tmp_path, tiny_bert):
    snapshot = tmp_path / "models--BAAI--bge-base-en-v1.5" / "snapshots" / "0123abc"
    shutil.copytree(tiny_bert, snapshot)
    model = Embedder.from_pretrained(str(snapshot), devices="cpu")
    assert model.query_instruction_for_retrieval == registry.BGE_EN_QUERY
    auto = FlagAutoModel.from_finetuned(str(snapshot), devices="cpu")
    assert auto.query_instruction_for_retrieval is None  # FlagEmbedding adds none unless asked
    assert auto.pooling_method == "cls"
    with_slash = Embedder.from_pretrained(f"{snapshot}/", devices="cpu")
    assert with_slash.query_instruction_for_retrieval == registry.BGE_EN_QUERY


def test_hub_cache_repo_folder_loads_its_snapshot(tmp_path, tiny_bert, tiny_bert_reranker):
    """The cache's repo folder (``models--BAAI--bge-base-en-v1.5``, as ``ls ~/.cache/huggingface/hub``
    shows it) was refused for having no config.json; it loads the snapshot refs/main names, and a
    reranker snapshot is known as the reranker it caches."""
    repo = tmp_path / "models--BAAI--bge-base-en-v1.5"
    shutil.copytree(tiny_bert, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    model = Embedder.from_pretrained(str(repo), devices="cpu")
    assert model.query_instruction_for_retrieval == registry.BGE_EN_QUERY
    assert model.encode("hi").shape == (32,)
    shutil.copytree(tiny_bert, repo / "snapshots" / "4567def")
    assert Path(model_folder(str(repo))).name == "0123abc", "refs/main decides between snapshots"
    (repo / "refs" / "main").unlink()
    with pytest.raises(ModelNotFoundError, match="2 snapshots and no refs/main"):
        model_folder(str(repo))
    reranker_snapshot = tmp_path / "models--BAAI--bge-reranker-base" / "snapshots" / "89ab"
    shutil.copytree(tiny_bert_reranker, reranker_snapshot)
    assert isinstance(Reranker.from_pretrained(str(reranker_snapshot), devices="cpu"), FlagReranker)
    assert type(Reranker.from_pretrained(f"{repo}/snapshots/0123abc", devices="cpu")).__name__ == "BiEncoderReranker"


def test_checkpoint_folders_and_overrides(tmp_path, tiny_bert):
    checkpoint = tmp_path / "run" / "checkpoint-100"
    shutil.copytree(tiny_bert, checkpoint)
    model = FlagAutoModel.from_finetuned(str(checkpoint), pooling_method="mean", devices="cpu")
    assert isinstance(model, FlagModel) and model.pooling_method == "mean"
    explicit = Embedder.from_pretrained(
        str(checkpoint), model_class="encoder-only-base", pooling_method="mean", query_instruction_for_retrieval="q: "
    )
    assert explicit.query_instruction_for_retrieval == "q: "
    no_instruction = Embedder.from_pretrained(
        str(tmp_path / "run" / "checkpoint-100"), query_instruction_for_retrieval=""
    )
    assert no_instruction.query_instruction_for_retrieval is None


def test_hub_ids_with_stray_whitespace_or_trailing_slash_are_hub_ids(tmp_path, monkeypatch, minilm_dir, tiny_bert):
    """'BAAI/bge-base-en-v1.5/' (tab completion) and ' BAAI/...' (pasted) were taken for folders and
    refused as missing; they are the hub id, while an existing folder of that name still wins."""
    for name in ("BAAI/bge-base-en-v1.5/", " BAAI/bge-base-en-v1.5", "BAAI/bge-base-en-v1.5 \n", "bge-base-en-v1.5/"):
        assert resolve(name, registry.EMBEDDERS)[0] == "BAAI/bge-base-en-v1.5"
    assert resolve("BAAI/bge-reranker-base/", registry.RERANKERS, for_reranker=True)[0] == "BAAI/bge-reranker-base"
    packaged = Embedder.from_pretrained(" sentence-transformers/all-MiniLM-L6-v2/ ", devices="cpu")
    assert (packaged.model_name_or_path, packaged.pooling_method) == ("sentence-transformers/all-MiniLM-L6-v2", "mean")
    assert FlagModel("sentence-transformers/all-MiniLM-L6-v2/", devices="cpu").encode("hi").shape == (384,)
    # a local folder named like a hub id is that folder, slash or not
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_bert, tmp_path / "BAAI" / "bge-base-en-v1.5")
    local = Embedder.from_pretrained("BAAI/bge-base-en-v1.5/", devices="cpu")
    assert local.encode("hi").shape == (32,)
    # missing folders keep their own error, naming the path as typed
    with pytest.raises(ModelNotFoundError, match=r"'\./missing/' does not exist"):
        resolve("./missing/", registry.EMBEDDERS)
    with pytest.raises(ModelNotFoundError, match=r"no local folder 'my-org/missing/' either"):
        FlagModel("my-org/missing/", devices="cpu")


def test_every_class_built_directly_names_the_model_as_the_cli_does(tiny_bert, tiny_bert_reranker, monkeypatch):
    """``FlagModel("org/name/")`` (or a folder given with a trailing slash) built directly kept the slash in
    ``model_name_or_path`` while ``from_pretrained`` and the CLI dropped it: one rule (``hub.model_name``)
    for every class."""
    from bgekit import AbsEmbedder, BGEM3FlagModel, FlagLLMModel
    from bgekit.eval.cli import _absolute_if_local
    from bgekit.hub import model_name

    hub_id = "sentence-transformers/all-MiniLM-L6-v2"
    for given in (f"{hub_id}/", f" {hub_id} ", f"{hub_id}/\n"):
        assert model_name(given) == hub_id == _absolute_if_local(given)
        assert FlagModel(given, devices="cpu").model_name_or_path == hub_id
    for given in (f"{tiny_bert}/", f" {tiny_bert}/ "):
        assert FlagModel(given, devices="cpu").model_name_or_path == str(tiny_bert)
        assert Embedder.from_pretrained(given, devices="cpu").model_name_or_path == str(tiny_bert)
        assert _absolute_if_local(given) == str(tiny_bert.resolve())
    assert FlagReranker(f"{tiny_bert_reranker}/", devices="cpu").model_name_or_path == str(tiny_bert_reranker)
    monkeypatch.chdir(tiny_bert.parent)  # a relative folder stays relative; the CLI records it absolute
    assert FlagModel(f"./{tiny_bert.name}/", devices="cpu").model_name_or_path == tiny_bert.name
    assert _absolute_if_local(f"./{tiny_bert.name}/") == str(tiny_bert.resolve())

    class Custom(AbsEmbedder):  # FlagEmbedding's abstract base, as a user subclasses it
        def encode_single_device(self, *args, **kwargs):
            raise NotImplementedError

    assert Custom(f"{hub_id}/").model_name_or_path == hub_id
    # offline, a hub id that is not here is named without the slash or spaces, by every class
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for cls in (FlagModel, FlagReranker, BGEM3FlagModel, FlagLLMModel):
        with pytest.raises(ModelNotFoundError, match=r"could not get model 'my-org/not-here' from the Hugging Face"):
            cls(" my-org/not-here/ ", devices="cpu")


class _TextPath:
    """An ``os.PathLike`` that is not a ``pathlib.Path`` (as ``py.path`` or a user's own path class)."""

    def __init__(self, path: str):
        self.path = path

    def __fspath__(self) -> str:
        return self.path


def test_model_name_is_always_a_str_or_a_clear_type_error(tiny_bert):
    """``hub.model_name`` is annotated ``-> str`` but returned a non-string argument unchanged, so
    ``FlagModel(None).model_name_or_path`` was None and the class failed only when it loaded; a value that is
    no name is now the TypeError saying so, wherever a model is named (the classes, ``from_pretrained``)."""
    import os

    from bgekit import AbsEmbedder, FlagLLMModel
    from bgekit.hub import model_name

    assert model_name(Path("org/name/")) == "org/name" and isinstance(model_name(tiny_bert), str)
    assert model_name(_TextPath(f"{tiny_bert}{os.sep}")) == str(tiny_bert)
    for value in (None, 3, b"BAAI/bge-m3", ["BAAI/bge-m3"]):
        with pytest.raises(
            TypeError, match=rf"must be a hub id or a folder path \(str or os\.PathLike\), got {type(value).__name__}"
        ):
            model_name(value)
        for load in (FlagModel, FlagReranker, FlagLLMModel, Embedder.from_pretrained, Reranker.from_pretrained):
            with pytest.raises(TypeError, match="must be a hub id or a folder path"):
                load(value)
    assert FlagModel(_TextPath(str(tiny_bert)), devices="cpu").model_name_or_path == str(tiny_bert)

    class Custom(AbsEmbedder):  # FlagEmbedding's base stores what a custom subclass passes: None stays None
        def encode_single_device(self, sentences, **kwargs):
            raise NotImplementedError

    assert Custom(None).model_name_or_path is None and Custom("org/name/").model_name_or_path == "org/name"


def test_model_class_override_for_unknown_hub_id():
    name, spec = resolve("my-org/my-model", registry.EMBEDDERS, "encoder-only-base")
    assert name == "my-org/my-model" and spec.kind == registry.ENCODER


def test_rerankers_resolve(golden_dir):
    folder = str(golden_dir / "models" / "xlmr-reranker")
    assert isinstance(Reranker.from_pretrained(folder, devices="cpu"), FlagReranker)
    assert isinstance(FlagAutoReranker.from_finetuned(folder, devices="cpu"), FlagReranker)


def test_every_embedder_family_reranks_by_cosine(tmp_path, golden_dir):
    """An M3 folder crashed on its dict output; an LLM embedder's folder (plain, or in the hub cache
    under a known embedder's name) was loaded as a cross-encoder and refused."""
    import numpy as np

    from bgekit import BGEM3FlagModel, FlagLLMModel

    pairs = [("what is a panda?", "The giant panda is a bear."), ("bamboo", "A fast-growing grass.")]
    models = golden_dir / "models"
    cached = tmp_path / "models--intfloat--e5-mistral-7b-instruct" / "snapshots" / "abc"
    shutil.copytree(models / "mistral-llm", cached)
    cases = [(models / "xlmr-m3", BGEM3FlagModel), (models / "mistral-llm", FlagLLMModel), (cached, FlagLLMModel)]
    for folder, embedder_class in cases:
        reranker = Reranker.from_pretrained(str(folder), devices="cpu")
        assert type(reranker).__name__ == "BiEncoderReranker" and isinstance(reranker.embedder, embedder_class)
        q = reranker.embedder.encode_queries([q for q, _ in pairs], convert_to_numpy=True)
        p = reranker.embedder.encode_corpus([p for _, p in pairs], convert_to_numpy=True)
        q, p = (x["dense_vecs"] if isinstance(x, dict) else x for x in (q, p))
        np.testing.assert_allclose(reranker.compute_score(pairs), (q * p).sum(axis=1), atol=1e-6)
    # reranker folders keep their own classes
    assert type(Reranker.from_pretrained(str(models / "gemma-llm-reranker"), devices="cpu")).__name__ == (
        "FlagLLMReranker"
    )


def test_auto_classes_cannot_be_instantiated():
    with pytest.raises(OSError, match="from_finetuned"):
        FlagAutoModel()
    with pytest.raises(OSError, match="from_finetuned"):
        FlagAutoReranker()


def test_decoder_folders_of_earlier_bgekit_versions_still_read(tmp_path, golden_dir):
    """Decoder folders fine-tuned before bgekit.json existed kept the instruction and its format under
    a ``bgekit`` key of config_sentence_transformers.json; they load with the same prompts."""
    import json
    import shutil

    folder = tmp_path / "old-decoder"
    shutil.copytree(golden_dir / "models" / "mistral-llm", folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 96}))
    legacy = {"query_instruction_for_retrieval": "Find it.", "query_instruction_format": "<instruct>{}\n<query>{}"}
    settings = {"prompts": {"query": "<instruct>Find it.\n<query>", "passage": "doc: "}, "bgekit": legacy}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(settings))
    spec = describe_folder(folder, registry.EMBEDDERS)
    assert (spec.kind, spec.pooling_method, spec.query_instruction, spec.query_instruction_format) == (
        registry.DECODER,
        "last_token",
        "Find it.",
        "<instruct>{}\n<query>{}",
    )
    assert (spec.passage_instruction, spec.max_length) == ("doc: ", 96)
    from bgekit.hub import read_folder_metadata, write_folder_metadata

    write_folder_metadata(folder, registry.DECODER, "last_token", query_instruction_for_retrieval="New.")
    assert read_folder_metadata(folder)["query_instruction_for_retrieval"] == "New.", "bgekit.json wins"
    assert describe_folder(folder, registry.EMBEDDERS).query_instruction == "New."
