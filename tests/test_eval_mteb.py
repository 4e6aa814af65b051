"""The mteb adapter, tested against mteb's documented encoder protocol. Inputs are built the way mteb
builds them: a torch DataLoader over rows with a "text" column (mteb 2.x), or plain lists of strings
(mteb 1.x). The dev extra installs mteb (``bgekit[mteb]``), so the tests that run mteb's own evaluators
run in CI; its tasks download their data from the hub, so those tests give the tasks local data."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from bgekit.eval.mteb import MtebEncoder

STS_MINI = Path(__file__).resolve().parents[1] / "examples" / "data" / "stsb-test-mini.tsv"


class PromptType(StrEnum):
    """mteb.types.PromptType: a str enum with these two values."""

    query = "query"
    document = "document"


@pytest.fixture(scope="module")
def model(tiny_bert):
    from bgekit import Embedder

    return Embedder.from_pretrained(str(tiny_bert), query_instruction_for_retrieval="query: ")


TEXTS = ["what is a panda?", "The giant panda is a bear.", "Paris is in France.", "bamboo"]


def loader(texts, batch_size=3, **columns):
    rows = [{"text": t, **{k: v[i] for k, v in columns.items()}} for i, t in enumerate(texts)]
    return DataLoader(rows, batch_size=batch_size)  # default collate: {"text": [...], ...} per batch


def test_mteb2_encode_routes_by_prompt_type(model):
    encoder = MtebEncoder(model)
    kwargs = {"task_metadata": None, "hf_split": "test", "hf_subset": "default"}
    queries = encoder.encode(loader(TEXTS), prompt_type=PromptType.query, **kwargs)
    documents = encoder.encode(loader(TEXTS, title=["", "Panda", "", ""]), prompt_type=PromptType.document, **kwargs)
    plain = encoder.encode(loader(TEXTS), prompt_type=None, **kwargs)
    assert queries.shape == (4, 32) and queries.dtype == np.float32
    np.testing.assert_allclose(queries, model.encode_queries(TEXTS), atol=1e-6)
    np.testing.assert_allclose(documents, model.encode_corpus(TEXTS), atol=1e-6)  # mteb joins titles itself
    np.testing.assert_allclose(plain, model.encode(TEXTS), atol=1e-6)
    assert not np.allclose(queries, plain), "queries must get the query instruction"


def test_mteb1_protocol(model):
    encoder = MtebEncoder(model, batch_size=2)
    np.testing.assert_allclose(encoder.encode(TEXTS, task_name="STSBenchmark"), model.encode(TEXTS), atol=1e-6)
    np.testing.assert_allclose(
        encoder.encode(TEXTS, task_name="SciFact", prompt_type="query"), model.encode_queries(TEXTS), atol=1e-6
    )
    np.testing.assert_allclose(encoder.encode_queries(TEXTS), model.encode_queries(TEXTS), atol=1e-6)
    corpus = [{"title": "Pandas", "text": "eat bamboo"}, {"title": "", "text": "Paris"}]
    np.testing.assert_allclose(
        encoder.encode_corpus(corpus), model.encode_corpus(["Pandas eat bamboo", "Paris"]), atol=1e-6
    )
    columns = {"title": ["Pandas", ""], "text": ["eat bamboo", "Paris"]}
    np.testing.assert_allclose(encoder.encode_corpus(columns), encoder.encode_corpus(corpus), atol=1e-6)


def test_similarity_is_cosine(model):
    encoder = MtebEncoder(model)
    a = encoder.encode(TEXTS[:2], task_name="x") * 3.0
    b = encoder.encode(TEXTS[2:], task_name="x")
    matrix = encoder.similarity(a, b)
    pairwise = encoder.similarity_pairwise(a, b)
    assert matrix.shape == (2, 2) and pairwise.shape == (2,)
    unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    np.testing.assert_allclose(matrix, unit @ b.T, atol=1e-6)
    np.testing.assert_allclose(pairwise, np.diag(matrix), atol=1e-6)


def test_loads_by_name_like_the_mteb_cli(tiny_bert):
    encoder = MtebEncoder(str(tiny_bert), revision="abc", device="cpu")
    assert encoder.encode(["hello"], task_name="x").shape == (1, 32)
    assert encoder.model_name == str(tiny_bert)


def test_satisfies_mteb_protocol_when_mteb_is_installed(model):
    mteb = pytest.importorskip("mteb")
    encoder = MtebEncoder(model)
    assert isinstance(encoder, mteb.models.EncoderProtocol)
    assert encoder.mteb_model_meta.similarity_fn_name is not None


def test_symmetric_tasks_get_the_query_instruction_where_the_family_wants_it(tiny_bert):
    """STS, classification and clustering calls come without a prompt type; they went through plain
    encode, so e5-style and instruction-template models lost the instruction their texts need."""
    from bgekit import Embedder
    from bgekit.errors import InputError

    kwargs = {"task_metadata": None, "hf_split": "test", "hf_subset": "default"}
    e5_like = Embedder.from_pretrained(
        str(tiny_bert), query_instruction_for_retrieval="query: ", passage_instruction_for_retrieval="passage: "
    )
    template = Embedder.from_pretrained(
        str(tiny_bert),
        query_instruction_for_retrieval="Retrieve semantically similar text.",
        query_instruction_format="Instruct: {}\nQuery: {}",
    )
    bge_like = Embedder.from_pretrained(str(tiny_bert), query_instruction_for_retrieval="Represent this: ")
    for model in (e5_like, template):
        encoder = MtebEncoder(model)
        np.testing.assert_allclose(encoder.encode(loader(TEXTS), **kwargs), model.encode_queries(TEXTS), atol=1e-6)
        np.testing.assert_allclose(encoder.encode(TEXTS, task_name="STS12"), model.encode_queries(TEXTS), atol=1e-6)
        assert not np.allclose(encoder.encode(TEXTS, task_name="STS12"), model.encode(TEXTS))
        np.testing.assert_allclose(  # documents still get the passage side
            encoder.encode(loader(TEXTS), prompt_type=PromptType.document, **kwargs),
            model.encode_corpus(TEXTS),
            atol=1e-6,
        )
    # a retrieval-only prefix (BGE's) stays off symmetric texts; symmetric="query" is FlagEmbedding 1.4.2's rule
    np.testing.assert_allclose(MtebEncoder(bge_like).encode(loader(TEXTS), **kwargs), bge_like.encode(TEXTS), atol=1e-6)
    as_queries = MtebEncoder(bge_like, symmetric="query").encode(loader(TEXTS), **kwargs)
    np.testing.assert_allclose(as_queries, bge_like.encode_queries(TEXTS), atol=1e-6)
    plain = MtebEncoder(e5_like, symmetric="plain").encode(TEXTS, task_name="STS12")
    np.testing.assert_allclose(plain, e5_like.encode(TEXTS), atol=1e-6)
    with pytest.raises(InputError, match="symmetric must be one of auto, query, plain"):
        MtebEncoder(e5_like, symmetric="queries")


def test_mteb_can_set_the_model_meta(tiny_bert):
    """mteb 2.x's ``ModelMeta.load_model`` calls the loader (``MtebEncoder(name, revision=...)``) and then
    sets ``model.mteb_model_meta = meta``; the read-only property raised AttributeError there."""
    meta = object()  # mteb's ModelMeta; any object stands in, mteb is not installed here
    encoder = MtebEncoder(str(tiny_bert), revision="abc", device="cpu")
    encoder.mteb_model_meta = meta
    assert encoder.mteb_model_meta is meta


@dataclass
class TaskMetadata:
    """The two fields of mteb.TaskMetadata that prompt lookup reads."""

    name: str
    type: str


PROMPTS = {
    "SciFact-query": "scifact queries: ",
    "SciFact": "scifact: ",
    "Retrieval-query": "retrieval queries: ",
    "Retrieval": "retrieval: ",
    "query": "any query: ",
    "document": "any document: ",
    "STS": "sts: ",
    "NFCorpus-document": "",
}


@pytest.mark.parametrize(
    ("task", "prompt_type", "key"),
    [
        (TaskMetadata("SciFact", "Retrieval"), PromptType.query, "SciFact-query"),
        (TaskMetadata("SciFact", "Retrieval"), PromptType.document, "SciFact"),
        (TaskMetadata("FiQA2018", "Retrieval"), PromptType.query, "Retrieval-query"),
        (TaskMetadata("FiQA2018", "Retrieval"), PromptType.document, "Retrieval"),
        (TaskMetadata("AskUbuntuDupQuestions", "Reranking"), PromptType.query, "query"),
        (TaskMetadata("AskUbuntuDupQuestions", "Reranking"), PromptType.document, "document"),
        (TaskMetadata("STSBenchmark", "STS"), None, "STS"),
        (TaskMetadata("NFCorpus", "Retrieval"), PromptType.document, "NFCorpus-document"),
    ],
)
def test_model_prompts_follow_mtebs_lookup_order(model, task, prompt_type, key):
    """mteb 2.x passes task_metadata and prompt_type; the per-task prompts it means for them were never read.
    The prompt found is that call's instruction: queries and symmetric texts in the query format, documents in
    the passage format ('' is no instruction)."""
    encoder = MtebEncoder(model, model_prompts=PROMPTS)
    assert encoder.get_prompt_name(task, prompt_type) == key
    kwargs = {"task_metadata": task, "hf_split": "test", "hf_subset": "default", "prompt_type": prompt_type}
    got = encoder.encode(loader(TEXTS), **kwargs)
    instruction = PROMPTS[key] or None
    if prompt_type == PromptType.document:
        expected = model.encode_corpus(TEXTS, instruction=instruction)
    else:
        expected = model.encode_queries(TEXTS, instruction=instruction)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    before = MtebEncoder(model).encode(loader(TEXTS), **kwargs)  # the prompt was not read
    assert np.allclose(got, before) == (key == "NFCorpus-document")  # '' on documents: as before, no instruction


def test_without_a_matching_prompt_the_calls_embed_as_before(model):
    encoder = MtebEncoder(model, model_prompts={"Clustering": "cluster: ", "SciFact-document": "doc: "})
    kwargs = {"hf_split": "test", "hf_subset": "default"}
    sts, scifact = TaskMetadata("STS12", "STS"), TaskMetadata("SciFact", "Retrieval")
    np.testing.assert_allclose(encoder.encode(loader(TEXTS), task_metadata=sts, **kwargs), model.encode(TEXTS))
    queries = encoder.encode(loader(TEXTS), task_metadata=scifact, prompt_type=PromptType.query, **kwargs)
    np.testing.assert_allclose(queries, model.encode_queries(TEXTS), atol=1e-6)  # the model's own instruction
    # mteb 1.x: a task name and no metadata; BEIR-style encode_queries / encode_corpus read the prompt type keys
    np.testing.assert_allclose(
        encoder.encode(TEXTS, task_name="SciFact", prompt_type="document"),
        model.encode_corpus(TEXTS, instruction="doc: "),
        atol=1e-6,
    )
    typed = MtebEncoder(model, model_prompts={"query": "q: ", "document": "d: "})
    np.testing.assert_allclose(typed.encode_queries(TEXTS), model.encode_queries(TEXTS, instruction="q: "), atol=1e-6)
    np.testing.assert_allclose(typed.encode_corpus(TEXTS), model.encode_corpus(TEXTS, instruction="d: "), atol=1e-6)


def test_model_name_keyword_and_bad_arguments(tiny_bert, model, golden_dir):
    from bgekit.errors import InputError

    encoder = MtebEncoder(model_name=str(tiny_bert), revision="abc", device="cpu")  # mteb 2.x's spelling
    assert encoder.model_name == str(tiny_bert) and encoder.encode(["hello"], task_name="x").shape == (1, 32)
    with pytest.raises(InputError, match="got both"):
        MtebEncoder(str(tiny_bert), model_name=str(tiny_bert))
    with pytest.raises(InputError, match="got neither"):
        MtebEncoder()
    with pytest.raises(InputError, match="model_prompts must map prompt names"):
        MtebEncoder(model, model_prompts={"SciFact": 3})
    with pytest.raises(InputError, match="task_examples are for in-context-learning embedders"):
        MtebEncoder(model, task_examples={"SciFact": [{"query": "q", "response": "r"}]})
    with pytest.raises(InputError, match=r"task_examples\['SciFact'\]: examples_for_task\[0\] is missing"):
        icl = golden_dir / "models" / "mistral-icl"
        MtebEncoder(str(icl), task_examples={"SciFact": [{"query": "q"}]}, device="cpu", model_class="decoder-only-icl")


ICL_INSTRUCTION = "Given a web search query, retrieve relevant passages."
ICL_EXAMPLES = [{"query": "what is a panda?", "response": "A bear."}]  # no instruct: takes the instruction
SCIFACT = "Given a scientific claim, retrieve documents that support or refute the claim."
SCIFACT_EXAMPLES = [
    {"instruct": SCIFACT, "query": "Pandas eat meat.", "response": "Giant pandas eat bamboo."},
    {"query": "Paris is in Spain.", "response": "Paris is the capital of France."},
]
STS = "Retrieve semantically similar text."


@pytest.fixture(scope="module")
def icl_path(golden_dir):
    return str(golden_dir / "models" / "mistral-icl")


def flag_icl(path, instruction, examples):
    """FlagICLModel set up for one task, as FlagEmbedding's MTEB runner sets it (set_instruction, set_examples)."""
    from bgekit import FlagICLModel

    return FlagICLModel(
        path, query_instruction_for_retrieval=instruction, examples_for_task=examples, devices="cpu", use_fp16=False
    )


def test_icl_models_take_each_tasks_instruction_and_examples(icl_path):
    """FlagEmbedding's MTEB runner gives bge-en-icl each task's instruction (and examples where it has them);
    MtebEncoder refused model_prompts for ICL models, so every task ran with the model's one instruction."""
    model = flag_icl(icl_path, ICL_INSTRUCTION, ICL_EXAMPLES)
    encoder = MtebEncoder(
        model,
        # "-query": the instruction is the queries' (FlagEmbedding's set_instruction); a bare task name is for
        # the documents too, in the passage format (mteb's lookup), which bge-en-icl does not want
        model_prompts={
            "SciFact-query": SCIFACT,
            "STS": STS,
            "FiQA2018-query": "Given a financial question, find answers.",
        },
        task_examples={"SciFact": SCIFACT_EXAMPLES, "STS12": []},
    )
    kwargs = {"hf_split": "test", "hf_subset": "default"}

    def queries(name, task_type, prompt_type=PromptType.query):
        task = TaskMetadata(name, task_type)
        return encoder.encode(loader(TEXTS), task_metadata=task, prompt_type=prompt_type, **kwargs)

    # the task's instruction and examples (an example without instruct takes the task's instruction)
    scifact = flag_icl(icl_path, SCIFACT, SCIFACT_EXAMPLES).encode_queries(TEXTS)
    np.testing.assert_allclose(queries("SciFact", "Retrieval"), scifact, atol=1e-5)
    # an instruction and no examples: the model's examples, their missing instruct the task's
    fiqa = flag_icl(icl_path, "Given a financial question, find answers.", ICL_EXAMPLES).encode_queries(TEXTS)
    np.testing.assert_allclose(queries("FiQA2018", "Retrieval"), fiqa, atol=1e-5)
    # neither: the model's own
    np.testing.assert_allclose(queries("NFCorpus", "Retrieval"), model.encode_queries(TEXTS), atol=1e-5)
    # documents: plain (no examples, and no prompt for SciFact's documents)
    documents = queries("SciFact", "Retrieval", PromptType.document)
    np.testing.assert_allclose(documents, model.encode_corpus(TEXTS), atol=1e-5)
    # a symmetric task: its texts as queries, with its type's instruction and its own (empty) examples list
    sts = flag_icl(icl_path, STS, []).encode_queries(TEXTS)
    np.testing.assert_allclose(queries("STS12", "STS", None), sts, atol=1e-5)
    assert not np.allclose(scifact, model.encode_queries(TEXTS), atol=1e-3)
    assert not np.allclose(fiqa, model.encode_queries(TEXTS), atol=1e-3)
    # mteb 1.x's encode_queries reads the "query" keys; the library call takes the same per-call settings
    typed = MtebEncoder(model, model_prompts={"query": SCIFACT}, task_examples={"query": SCIFACT_EXAMPLES})
    np.testing.assert_allclose(typed.encode_queries(TEXTS), scifact, atol=1e-5)
    direct = model.encode_queries(TEXTS, instruction=SCIFACT, examples_for_task=SCIFACT_EXAMPLES)
    np.testing.assert_allclose(direct, scifact, atol=1e-5)
    assert model.query_instruction_for_retrieval == ICL_INSTRUCTION  # per call: the model is left as it was


CLASSIFICATION = TaskMetadata("Banking77Classification", "Classification")


def test_normalize_for_classification_is_flagembeddings_runner_as_an_option(model, tiny_bert):
    """FlagEmbedding 1.4.2's MTEB runner embeds Classification tasks unnormalized (set_normalize_embeddings
    False); MtebEncoder kept the model's setting with no way to ask for that. ``normalize_for_classification``
    is that choice; None (the default) keeps the model's own, other task types always do."""
    from bgekit import AbsEmbedder, Embedder
    from bgekit.errors import InputError

    kwargs = {"hf_split": "test", "hf_subset": "default"}
    raw = model.encode(TEXTS, normalize_embeddings=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)  # the model normalizes: a real change
    default = MtebEncoder(model).encode(loader(TEXTS), task_metadata=CLASSIFICATION, **kwargs)
    np.testing.assert_allclose(default, model.encode(TEXTS), atol=1e-6)
    flag = MtebEncoder(model, normalize_for_classification=False)
    np.testing.assert_allclose(flag.encode(loader(TEXTS), task_metadata=CLASSIFICATION, **kwargs), raw, atol=1e-5)
    for other in (TaskMetadata("STS12", "STS"), TaskMetadata("RedditClustering", "Clustering")):
        np.testing.assert_allclose(
            flag.encode(loader(TEXTS), task_metadata=other, **kwargs), model.encode(TEXTS), atol=1e-6
        )
    assert model.normalize_embeddings is True  # set for the call, not on the model

    unnormalized = Embedder.from_pretrained(str(tiny_bert), normalize_embeddings=False)
    on = MtebEncoder(unnormalized, normalize_for_classification=True)
    np.testing.assert_allclose(
        on.encode(loader(TEXTS), task_metadata=CLASSIFICATION, **kwargs), model.encode(TEXTS), atol=1e-5
    )

    class Counts(AbsEmbedder):  # a custom FlagEmbedding model reads the attribute FlagEmbedding's runner sets
        def encode_single_device(self, sentences, **options):
            rows = np.array([[len(s), s.count(" ") + 1.0] for s in sentences], dtype=np.float32)
            return rows / np.linalg.norm(rows, axis=1, keepdims=True) if self.normalize_embeddings else rows

    counts = Counts("none", devices="cpu")
    got = MtebEncoder(counts, normalize_for_classification=False).encode(TEXTS, task_metadata=CLASSIFICATION)
    assert got[0].tolist() == [16.0, 4.0] and counts.normalize_embeddings is True
    with pytest.raises(InputError, match="normalize_for_classification must be True, False or None"):
        MtebEncoder(model, normalize_for_classification="off")


def test_normalize_for_classification_under_mteb(model, tiny_bert):
    """The installed mteb package runs its own Classification evaluator (logistic regression on the vectors) on
    local data: with ``normalize_for_classification=False`` a normalizing model scores as the same weights
    without normalization do, and the default as the model itself; mteb 1.x's ``task_name`` alone finds the
    task's type through mteb."""
    mteb = pytest.importorskip("mteb")
    from datasets import Dataset

    from bgekit import Embedder

    sentences = [line.split("\t")[0] for line in STS_MINI.read_text().splitlines()[1:49]]
    labels = [i % 3 for i in range(len(sentences))]

    def scores(encoder):
        task = mteb.get_task("Banking77Classification")
        split = {"text": sentences[:24], "label": labels[:24]}, {"text": sentences[24:], "label": labels[24:]}
        task.dataset = {"default": {"train": Dataset.from_dict(split[0]), "test": Dataset.from_dict(split[1])}}
        task.data_loaded = True
        result = mteb.evaluate(encoder, [task], cache=None, overwrite_strategy="always")
        return result.task_results[0].scores["test"][0]

    unnormalized = Embedder.from_pretrained(str(tiny_bert), normalize_embeddings=False)
    flag = scores(MtebEncoder(model, normalize_for_classification=False))
    assert flag == scores(MtebEncoder(unnormalized))
    assert scores(MtebEncoder(model)) != flag  # the model's own (normalized) vectors score otherwise
    raw = MtebEncoder(model, normalize_for_classification=False).encode(TEXTS, task_name="Banking77Classification")
    np.testing.assert_allclose(raw, model.encode(TEXTS, normalize_embeddings=False), atol=1e-5)


def test_model_meta_names_a_local_folder_by_its_last_two_parts(tiny_bert):
    """mteb's results layout has a folder per model name; a local folder's whole path made that
    ``__tmp__pytest-of-...__bert``. Its last two parts name it (a hub id as it is)."""
    pytest.importorskip("mteb")
    meta = MtebEncoder(str(tiny_bert), device="cpu").mteb_model_meta
    assert meta.name == f"{tiny_bert.parent.name}/{tiny_bert.name}"
    assert meta.similarity_fn_name == "cosine" and meta.embed_dim == 32
