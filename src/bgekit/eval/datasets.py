"""Evaluation datasets: BEIR retrieval folders, FlagEmbedding's custom layout, STS pairs.

Retrieval layouts (detected from the files in the folder):

- **BEIR** (what MTEB and ``beir.GenericDataLoader`` read): ``corpus.jsonl`` (or ``.jsonl.gz``)
  with ``{"_id", "title", "text"}``, ``queries.jsonl`` with ``{"_id", "text"}``, and
  ``qrels/<split>.tsv`` with the header ``query-id  corpus-id  score`` (TREC qrels lines
  ``qid 0 docid rel`` are read too).
- **custom** (FlagEmbedding's local layout): ``corpus.jsonl`` with ``{"id", "title", "text"}``,
  ``<split>_queries.jsonl`` with ``{"id", "text"}``, ``<split>_qrels.jsonl`` with
  ``{"qid", "docid", "relevance"}``, and optionally ``<split>_excluded.jsonl`` with ``{"qid", "docid"}``:
  documents never ranked for that query (BRIGHT's ``excluded_ids``). A qrels file of ``{"qid", "answers"}``
  instead (FlagEmbedding's MKQA layout) judges each query by its answer strings found in the retrieved text.

Documents are embedded as ``(title + " " + text).strip()``, as MTEB and BEIR do. Only the
queries judged in the split are kept. Online, :func:`load_retrieval_dataset` also takes a
BEIR dataset name (the official zip), FlagEmbedding's ``miracl/LANG``, ``mldr/LANG``, ``msmarco-passage``,
``mkqa/LANG``, ``bright/TASK`` or ``bright-long/TASK`` (:mod:`bgekit.eval.named`) or a Hugging Face dataset id
(``mteb/scifact``).

STS files are ``sentence1<TAB>sentence2<TAB>score`` lines with an optional header, read with
CSV quoting off (some sentences hold unbalanced double quotes).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import io
from ..errors import DataFormatError, InputError

logger = logging.getLogger(__name__)

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
#: BEIR datasets that the official zips hold (``load_retrieval_dataset("scifact")`` online)
BEIR_DATASETS = (
    "arguana",
    "climate-fever",
    "cqadupstack",
    "dbpedia-entity",
    "fever",
    "fiqa",
    "hotpotqa",
    "msmarco",
    "nfcorpus",
    "nq",
    "quora",
    "scidocs",
    "scifact",
    "trec-covid",
    "webis-touche2020",
)
#: the forums of BEIR's ``cqadupstack`` archive, each a dataset of its own (``cqadupstack/android``);
#: MTEB's CQADupstackRetrieval score is the mean of their scores
CQADUPSTACK_FORUMS = (
    "android",
    "english",
    "gaming",
    "gis",
    "mathematica",
    "physics",
    "programmers",
    "stats",
    "tex",
    "unix",
    "webmasters",
    "wordpress",
)
#: the first part of FlagEmbedding's named sets (:mod:`bgekit.eval.named`)
_NAMED_FAMILIES = ("miracl", "mldr", "msmarco", "msmarco-passage", "mkqa", "bright", "bright-long", "bright_long")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class RetrievalDataset:
    """A corpus, the queries of one split and their relevance judgments.

    ``corpus_texts[i]`` is the text to embed for ``corpus_ids[i]`` (title and text joined);
    ``queries`` maps query id to text for the judged queries only; ``qrels`` maps query id to
    ``{doc_id: relevance}`` (ints, as pytrec_eval wants); ``problems`` counts what was wrong
    but not fatal (judgments naming unknown documents or queries); ``excluded`` maps a query id to the
    documents never ranked for it (BRIGHT's); ``query_instruction`` is the dataset's own query
    instruction (BRIGHT's per task), used when none is given; ``answers`` maps a query id to its answer
    strings when the dataset is judged by answers (MKQA) rather than ``qrels`` (then empty).
    """

    name: str
    split: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    path: Path | None = None
    layout: str = "beir"
    problems: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, set[str]] = field(default_factory=dict)
    query_instruction: str | None = None
    answers: dict[str, list[str]] = field(default_factory=dict)
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.corpus_ids) != len(self.corpus_texts):
            raise InputError("corpus_ids and corpus_texts must have the same length")
        if not self.corpus_ids:
            raise InputError(f"dataset {self.name!r} has an empty corpus")
        if len(set(self.corpus_ids)) != len(self.corpus_ids):
            raise InputError(f"dataset {self.name!r} has duplicate document ids")
        if not self.queries:
            raise InputError(f"dataset {self.name!r} has no judged queries in split {self.split!r}")

    @classmethod
    def from_dicts(
        cls,
        corpus: dict[str, str | dict[str, str]],
        queries: dict[str, str],
        qrels: dict[str, dict[str, int]],
        name: str = "custom",
        split: str = "test",
    ) -> RetrievalDataset:
        """Build a dataset in memory; corpus values are texts or ``{"title", "text"}`` dicts."""
        ids, texts = [], []
        for doc_id, value in corpus.items():
            ids.append(str(doc_id))
            if isinstance(value, dict):
                title, text = value.get("title") or "", value.get("text", "")
                texts.append(io.document_text(title, text))
            else:
                texts.append(value)
        qrels = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}
        judged = {str(q): t for q, t in queries.items() if str(q) in qrels}
        return cls(name, split, ids, texts, judged, {q: qrels[q] for q in judged})

    @property
    def n_judgments(self) -> int:
        return sum(len(docs) for docs in self.qrels.values())

    def fingerprint(self) -> str:
        """sha256 of the corpus ids and texts in order (what the corpus embeddings depend on)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for doc_id, text in zip(self.corpus_ids, self.corpus_texts, strict=True):
                digest.update(doc_id.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


@dataclass
class StsDataset:
    """Sentence pairs with gold similarity scores."""

    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]
    path: Path | None = None
    name: str = "sts"

    def __len__(self) -> int:
        return len(self.scores)


# -- retrieval --------------------------------------------------------------------------------
def load_retrieval_dataset(
    name_or_path: str | Path, split: str = "test", *, cache_dir: str | Path | None = None, revision: str | None = None
) -> RetrievalDataset:
    """Load a retrieval dataset from a local folder (BEIR or custom layout).

    Online, ``name_or_path`` may also be a BEIR dataset name (``"scifact"``: the official zip,
    downloaded once into ``cache_dir``) or a Hugging Face dataset id holding BEIR files
    (``"mteb/scifact"``; pin ``revision`` to reproduce a published number); see :func:`resolve_dataset`.
    """
    if _names_whole_cqadupstack(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise InputError(  # refused before the archive is downloaded
            f"cqadupstack is {len(CQADUPSTACK_FORUMS)} datasets, one a forum: load one as cqadupstack/FORUM, "
            f"FORUM one of {', '.join(CQADUPSTACK_FORUMS)}; {_WHOLE_CQADUPSTACK}"
        )
    dataset = load_local_dataset(
        resolve_dataset(name_or_path, cache_dir=cache_dir, revision=revision, split=split), split
    )
    named = None if Path(name_or_path).expanduser().exists() else _named(name_or_path)
    if named is not None:  # "mldr/de", not the folder's "de"
        dataset.name = named.name
        dataset.query_instruction = named.query_instruction
    return dataset


def resolve_dataset(
    name_or_path: str | Path,
    *,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    split: str | None = None,
) -> Path:
    """The local folder of a dataset as every command names one (``bgekit eval retrieval --dataset``,
    ``bgekit data beir-to-train --dataset``, ``bgekit mine --corpus``): an existing path as it is; else a
    BEIR dataset name (``"scifact"``), ``"cqadupstack"`` (the archive, its forums as subfolders) or
    ``"cqadupstack/FORUM"`` (one forum), downloaded once into ``cache_dir`` (default
    ``$BGEKIT_CACHE/datasets``), one of FlagEmbedding's named sets (``"miracl/LANG"``, ``"mldr/LANG"``,
    ``"msmarco-passage"``, ``"mkqa/LANG"``, ``"bright/TASK"``, ``"bright-long/TASK"``: fetched and converted
    once into its layout there, the corpus and, when given, ``split``; see :mod:`bgekit.eval.named`), or a
    Hugging Face dataset id holding BEIR files (``"mteb/scifact"``).
    Anything else, or a download that fails (offline: ``HF_HUB_OFFLINE=1``, or no network), is an
    :class:`InputError` naming the dataset, where it was looked for and what to pass instead."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    named = _named(name)
    if named is not None:
        from .named import resolve_named

        return resolve_named(named, Path(cache_dir or default_cache_dir() / "datasets").expanduser(), split)
    parent, _, forum = name.strip().rstrip("/").lower().partition("/")
    if parent == "cqadupstack":
        if forum and forum not in CQADUPSTACK_FORUMS:
            raise InputError(
                f"cqadupstack has no forum {forum!r}: cqadupstack/FORUM names one, FORUM one of "
                f"{', '.join(CQADUPSTACK_FORUMS)}; cqadupstack alone is all of them"
            )
        archive = download_beir("cqadupstack", cache_dir=cache_dir)
        return archive / forum if forum else archive
    if name.lower() in BEIR_DATASETS:
        return download_beir(name.lower(), cache_dir=cache_dir)
    if is_dataset_name(name):
        return download_hf_dataset(name, revision=revision, cache_dir=cache_dir)
    raise InputError(
        f"dataset {name!r} is not a folder here, a BEIR dataset name ({', '.join(BEIR_DATASETS)}), "
        "miracl/LANG, mldr/LANG, msmarco-passage, mkqa/LANG, bright/TASK, bright-long/TASK or a Hugging Face "
        "dataset id like "
        "'mteb/scifact'"
    )


def _named(name: str | Path) -> Any:
    """FlagEmbedding's named set ``name`` reads as (:func:`bgekit.eval.named.named_dataset`), or None."""
    from .named import named_dataset

    return named_dataset(name)


def is_dataset_name(name: str | Path) -> bool:
    """True when ``name`` (not an existing path) reads as a dataset :func:`resolve_dataset` fetches: a BEIR
    dataset name, ``cqadupstack[/FORUM]``, or a Hugging Face dataset id (``org/name``) whose first part is not
    a folder here (``data/scifactt`` under an existing ``data/`` is a mistyped folder, not a download)."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        return False
    if text.strip().rstrip("/").lower().partition("/")[0] == "cqadupstack" or text.lower() in BEIR_DATASETS:
        return True
    if text.strip().rstrip("/").lower().partition("/")[0] in _NAMED_FAMILIES:
        return True  # FlagEmbedding's named sets (a language it lacks is resolve_dataset's error)
    return bool(_HF_ID.match(text)) and not path.parent.is_dir()


def _names_whole_cqadupstack(name_or_path: str | Path) -> bool:
    return str(name_or_path).strip().rstrip("/").lower() == "cqadupstack"


def detect_layout(folder: Path, split: str) -> str:
    """``"beir"`` or ``"custom"`` from the files present; a clear error when neither fits."""
    if not folder.is_dir():
        raise InputError(f"dataset {folder} is not a folder")
    custom = (f"{split}_queries.jsonl", f"{split}_qrels.jsonl")
    if any((folder / f"{name}{gz}").exists() for name in custom for gz in ("", ".gz")):
        return "custom"
    return "beir"


def dataset_files(folder: str | Path, split: str = "test") -> list[Path]:
    """The files of a local dataset folder that loading ``split`` may read (either layout), so a
    command can refuse to write its output over one of them before it reads them."""
    folder = Path(folder).expanduser()
    names = ["corpus.jsonl", "queries.jsonl", f"{split}_queries.jsonl", f"{split}_qrels.jsonl", f"qrels/{split}.tsv"]
    names.append(f"{split}_excluded.jsonl")
    return [folder / f"{name}{gz}" for name in names for gz in ("", ".gz") if (folder / f"{name}{gz}").is_file()]


def load_local_dataset(folder: str | Path, split: str = "test") -> RetrievalDataset:
    """Read a dataset folder in the BEIR or the custom layout (see the module docstring)."""
    folder = Path(folder)
    layout = detect_layout(folder, split)
    nested = _nested_datasets(folder)
    if nested:  # cqadupstack's archive: a folder of datasets, not one
        whole = f"; {_WHOLE_CQADUPSTACK}" if set(nested) <= set(CQADUPSTACK_FORUMS) else ""
        raise InputError(
            f"{folder} holds {len(nested)} datasets, not one ({', '.join(nested)}); pass one of their folders{whole}"
        )
    corpus_path, queries_path, qrels_path = required_files(folder, split, layout)
    if layout == "custom" and _holds_answers(qrels_path):
        return _answers_dataset(folder, split, corpus_path, queries_path, qrels_path)
    qrels = read_qrels_jsonl(qrels_path) if layout == "custom" else read_qrels_tsv(qrels_path)
    ids, texts = read_corpus(corpus_path)
    queries = read_queries(queries_path)
    dataset = assemble(folder.name, split, ids, texts, queries, qrels, folder, layout, qrels_path)
    excluded_path = folder / f"{split}_excluded.jsonl"
    if layout == "custom" and excluded_path.is_file():
        dataset.excluded = {q: docs for q, docs in read_excluded(excluded_path).items() if q in dataset.queries}
    return dataset


def _holds_answers(path: Path) -> bool:
    """A custom-layout qrels file of ``{"qid", "answers"}`` (FlagEmbedding's MKQA layout)."""
    for _, obj in io.read_jsonl(path):
        return "answers" in obj and "docid" not in obj
    return False


def read_answers(path: Path) -> dict[str, list[str]]:
    """``{"qid", "answers": [...]}`` one a line: each query's answer strings (a later line replaces an earlier)."""
    answers: dict[str, list[str]] = {}
    for line, obj in io.read_jsonl(path):
        query_id = _record_id(obj, path, line, ("qid",))
        given = obj.get("answers")
        if not isinstance(given, list) or not all(isinstance(a, str) for a in given):
            raise DataFormatError(path, line, f"'answers' must be a list of strings, got {given!r}")
        answers[query_id] = given
    if not answers:
        raise InputError(f"{path} holds no answers")
    return answers


def _answers_dataset(
    folder: Path, split: str, corpus_path: Path, queries_path: Path, answers_path: Path
) -> RetrievalDataset:
    answers = read_answers(answers_path)
    ids, texts = read_corpus(corpus_path)
    queries = read_queries(queries_path)
    kept = {q: text for q, text in queries.items() if q in answers}
    if not kept:
        raise InputError(f"none of the {len(answers)} queries answered in {answers_path} is in the queries file")
    unknown = sum(1 for q in answers if q not in queries)
    if unknown:
        logger.warning("%s: %d answered query id(s) are not in the queries file; left out", answers_path, unknown)
    dataset = RetrievalDataset(
        folder.name, split, ids, texts, kept, {}, folder, "custom", {"answers_unknown_queries": unknown}
    )
    dataset.answers = {q: answers[q] for q in kept}
    return dataset


def read_excluded(path: Path) -> dict[str, set[str]]:
    """``{"qid", "docid"}`` one a line: the documents never ranked for each query."""
    excluded: dict[str, set[str]] = {}
    for line, obj in io.read_jsonl(path):
        query_id = _record_id(obj, path, line, ("qid",))
        excluded.setdefault(query_id, set()).add(_record_id(obj, path, line, ("docid",)))
    return excluded


def cqadupstack_forums(name_or_path: str | Path, *, cache_dir: str | Path | None = None) -> list[Path] | None:
    """The forum folders when ``name_or_path`` is CQADupStack as a whole, else None.

    CQADupStack as a whole is a folder whose datasets are subfolders named as its forums (BEIR's
    ``cqadupstack`` archive: ``android/``, ``english/`` ... ``wordpress/``, each with its own corpus),
    or, online, the name ``cqadupstack`` (the archive, downloaded once into ``cache_dir``). Its score
    is the mean of the forums' scores, each forum searched in its own corpus (BEIR, MTEB).
    """
    if isinstance(name_or_path, RetrievalDataset):
        return None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if not _names_whole_cqadupstack(name_or_path):
            return None
        path = resolve_dataset(name_or_path, cache_dir=cache_dir)
    nested = _nested_datasets(path)
    if not nested or not set(nested) <= set(CQADUPSTACK_FORUMS):
        return None
    return [path / name for name in nested]


_WHOLE_CQADUPSTACK = (
    "evaluate_retrieval (bgekit eval retrieval) takes the whole of it, evaluates each forum in its own corpus and "
    "reports their mean, the CQADupStack score of BEIR and MTEB; bgekit data beir-to-train and bgekit mine --corpus "
    "take it too (one training file a forum, each forum mined in its own corpus)"
)


def _nested_datasets(folder: Path) -> list[str]:
    """The subfolders holding a corpus when ``folder`` itself has none."""
    if not folder.is_dir() or _has_corpus(folder):
        return []
    return sorted(sub.name for sub in folder.iterdir() if sub.is_dir() and _has_corpus(sub))


def _has_corpus(folder: Path) -> bool:
    return any((folder / f"corpus.jsonl{gz}").exists() for gz in ("", ".gz"))


def assemble(
    name: str,
    split: str,
    ids: list[str],
    texts: list[str],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    folder: Path | None,
    layout: str,
    qrels_path: Path,
) -> RetrievalDataset:
    """Join the parts: keep judged queries, warn about (and count) judgments naming unknowns."""
    if not qrels:
        raise InputError(f"{qrels_path} holds no judgments")
    known_docs = set(ids)
    unknown_queries = sorted(q for q in qrels if q not in queries)
    unknown_docs = sorted({d for docs in qrels.values() for d in docs if d not in known_docs})
    problems = {"qrels_unknown_queries": len(unknown_queries), "qrels_unknown_documents": len(unknown_docs)}
    if unknown_queries:
        logger.warning(
            "%s: %d judged query id(s) are not in the queries file (e.g. %s); they are left out of the evaluation",
            qrels_path,
            len(unknown_queries),
            ", ".join(repr(q) for q in unknown_queries[:3]),
        )
    if unknown_docs:
        logger.warning(
            "%s: %d judged document id(s) are not in the corpus (e.g. %s); they still count as relevant "
            "documents (that no system can retrieve), as in trec_eval",
            qrels_path,
            len(unknown_docs),
            ", ".join(repr(d) for d in unknown_docs[:3]),
        )
    judged = {q: queries[q] for q in qrels if q in queries}
    if not judged:
        raise InputError(f"none of the {len(qrels)} queries judged in {qrels_path} is in the queries file")
    dataset = RetrievalDataset(name, split, ids, texts, judged, {q: qrels[q] for q in judged}, folder, layout, problems)
    logger.info(
        "dataset %s (%s): %d documents, %d queries, %d judgments",
        name,
        split,
        len(ids),
        len(judged),
        dataset.n_judgments,
    )
    return dataset


def required_files(folder: Path, split: str, layout: str | None = None) -> tuple[Path, Path, Path]:
    """The corpus, queries and qrels files of a dataset folder, or the :class:`InputError` naming the one
    missing, without reading them (CQADupStack's forums are all checked before any is embedded)."""
    layout = layout or detect_layout(folder, split)
    if layout == "custom":
        queries, qrels = f"{split}_queries.jsonl", f"{split}_qrels.jsonl"
    else:
        queries, qrels = "queries.jsonl", f"qrels/{split}.tsv"
    corpus_path, queries_path, qrels_path = (
        _require(folder, [name, f"{name}.gz"], split, layout) for name in ("corpus.jsonl", queries, qrels)
    )
    return corpus_path, queries_path, qrels_path


def _require(folder: Path, candidates: list[str], split: str, layout: str) -> Path:
    for candidate in candidates:
        if (folder / candidate).exists():
            return folder / candidate
    splits = available_splits(folder)
    hint = f" (splits found: {', '.join(splits)})" if splits and split not in splits else ""
    expected = (
        "corpus.jsonl, queries.jsonl and qrels/<split>.tsv (BEIR layout)"
        if layout == "beir"
        else "corpus.jsonl, <split>_queries.jsonl and <split>_qrels.jsonl (custom layout)"
    )
    raise InputError(f"dataset folder {folder} is missing {candidates[0]}{hint}; a retrieval dataset needs {expected}")


def available_splits(folder: Path) -> list[str]:
    """Split names with judgments in ``folder`` (either layout)."""
    names = {p.name.split(".")[0] for p in (folder / "qrels").glob("*.tsv*")} if (folder / "qrels").is_dir() else set()
    names |= {p.name.split("_qrels.jsonl")[0] for p in folder.glob("*_qrels.jsonl*")}
    return sorted(names)


def read_corpus(path: Path) -> tuple[list[str], list[str]]:
    """Document ids and texts (``(title + " " + text).strip()``), in file order; ids must be unique."""
    ids: list[str] = []
    texts: list[str] = []
    first_line: dict[str, int] = {}
    for line, obj in io.read_jsonl(path):
        doc_id = _record_id(obj, path, line, ("_id", "id"))
        if doc_id in first_line:
            raise DataFormatError(path, line, f"duplicate document id {doc_id!r} (first on line {first_line[doc_id]})")
        first_line[doc_id] = line
        ids.append(doc_id)
        texts.append(io.record_text(obj, path, line))
    if not ids:
        raise InputError(f"{path} holds no documents: the corpus is empty")
    return ids, texts


def read_queries(path: Path) -> dict[str, str]:
    """Query id -> text, in file order; ids must be unique."""
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, obj in io.read_jsonl(path):
        query_id = _record_id(obj, path, line, ("_id", "id"))
        if query_id in first_line:
            raise DataFormatError(path, line, f"duplicate query id {query_id!r} (first on line {first_line[query_id]})")
        first_line[query_id] = line
        text = obj.get("text")
        if not isinstance(text, str):
            raise DataFormatError(path, line, f"a query needs a string 'text' field (keys: {sorted(obj)})")
        queries[query_id] = text
    if not queries:
        raise InputError(f"{path} holds no queries")
    return queries


def _record_id(obj: dict[str, Any], path: Path, line: int, keys: tuple[str, ...]) -> str:
    for key in keys:
        if key in obj:
            value = obj[key]
            if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
                raise DataFormatError(path, line, f"{key!r} must be a non-empty string or integer, got {value!r}")
            return str(value)
    raise DataFormatError(
        path, line, f"missing the id field ({' or '.join(repr(k) for k in keys)}; keys: {sorted(obj)})"
    )


def _relevance(value: str, path: Path, line: int) -> int:
    try:
        number = float(value)
    except ValueError:
        raise DataFormatError(path, line, f"relevance {value!r} is not a number") from None
    if not number.is_integer():
        raise DataFormatError(path, line, f"relevance {value!r} is not a whole number (trec_eval needs integer grades)")
    return int(number)


class _Judgments:
    """Collects qrels; a repeated (query, document) pair with another grade is an error."""

    def __init__(self, path: Path):
        self.path = path
        self.qrels: dict[str, dict[str, int]] = {}
        self.first_line: dict[tuple[str, str], int] = {}
        self.repeats = 0

    def add(self, query_id: str, doc_id: str, relevance: int, line: int) -> None:
        docs = self.qrels.setdefault(query_id, {})
        if doc_id in docs:
            if docs[doc_id] != relevance:
                raise DataFormatError(
                    self.path,
                    line,
                    f"({query_id!r}, {doc_id!r}) is judged {relevance} here but {docs[doc_id]} on line "
                    f"{self.first_line[(query_id, doc_id)]}",
                )
            self.repeats += 1
            return
        docs[doc_id] = relevance
        self.first_line[(query_id, doc_id)] = line

    def result(self) -> dict[str, dict[str, int]]:
        if self.repeats:
            logger.warning("%s: %d repeated judgment line(s) ignored", self.path, self.repeats)
        if not self.qrels:
            raise InputError(f"{self.path} holds no judgments")
        return self.qrels


def read_qrels_tsv(path: Path) -> dict[str, dict[str, int]]:
    """BEIR ``query-id<TAB>corpus-id<TAB>score`` (header optional) or TREC ``qid 0 docid rel`` lines."""
    judgments = _Judgments(path)
    first = True
    for line_number, raw in io.numbered_lines(path):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            parts = line.split()
        if len(parts) == 4:  # TREC qrels: qid iteration docid relevance
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise DataFormatError(
                path,
                line_number,
                f"expected 3 tab-separated columns (query-id, corpus-id, score), found {len(parts)}",
            )
        query_id, doc_id, score = (p.strip() for p in parts)
        if _qrels_header(query_id, score):
            if first:  # the first line that is not blank
                first = False
                continue
            raise DataFormatError(
                path, line_number, "a header line after the first judgments (two qrels files joined?); remove it"
            )
        first = False
        if not query_id or not doc_id:
            raise DataFormatError(path, line_number, "empty query or document id")
        judgments.add(query_id, doc_id, _relevance(score, path, line_number), line_number)
    return judgments.result()


def read_qrels_jsonl(path: Path) -> dict[str, dict[str, int]]:
    """Custom layout: ``{"qid", "docid", "relevance"}`` one a line."""
    judgments = _Judgments(path)
    for line, obj in io.read_jsonl(path):
        missing = [k for k in ("qid", "docid", "relevance") if k not in obj]
        if missing:
            raise DataFormatError(path, line, f"missing {', '.join(repr(k) for k in missing)} (keys: {sorted(obj)})")
        query_id = _record_id(obj, path, line, ("qid",))
        doc_id = _record_id(obj, path, line, ("docid",))
        judgments.add(query_id, doc_id, _relevance(str(obj["relevance"]), path, line), line)
    return judgments.result()


def _qrels_header(query_id: str, score: str) -> bool:
    """A first line like ``query-id<TAB>corpus-id<TAB>score``; a first judgment with a bad grade is not
    one (it gets the grade's error, not silently dropped)."""
    names = {"query-id", "query_id", "qid", "query", "score", "relevance", "rel", "label", "grade"}
    return not _is_number(score) and (query_id.lower() in names or score.lower() in names)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# -- STS ------------------------------------------------------------------------------------
def load_sts(path: str | Path) -> StsDataset:
    """Read ``sentence1<TAB>sentence2<TAB>score`` lines (header optional; extra columns are
    named by the header). Quoting is off: quotes are part of the sentences."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"STS file {path} does not exist")
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass a sentence1<TAB>sentence2<TAB>score file")
    columns = (0, 1, 2)
    unnamed_header: str | None = None  # line 1's score when it was taken for a header with other names
    first1: list[str] = []
    first2: list[str] = []
    scores: list[float] = []
    for line_number, raw in io.numbered_lines(path):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t")
        if line_number == 1:
            header = [p.strip().lower() for p in parts]
            if {"sentence1", "sentence2", "score"} <= set(header):
                columns = (header.index("sentence1"), header.index("sentence2"), header.index("score"))
                continue
            if len(parts) == 3 and not _is_number(parts[2]):
                unnamed_header = parts[2].strip()
                continue  # a header with other names: columns taken in order
        if len(parts) <= max(columns):
            raise DataFormatError(
                path,
                line_number,
                f"expected {max(columns) + 1} tab-separated columns (sentence1, sentence2, score), found {len(parts)}",
            )
        value = parts[columns[2]].strip()
        if not _is_number(value):
            raise DataFormatError(path, line_number, f"score {value!r} is not a number")
        if not math.isfinite(float(value)):  # one NaN made every correlation NaN (and the JSON report invalid)
            raise DataFormatError(path, line_number, f"score {value!r} is not a finite number")
        first1.append(parts[columns[0]])
        first2.append(parts[columns[1]])
        scores.append(float(value))
    if not scores:
        if unnamed_header is not None:  # its only line: a pair with a bad score, not a header of nothing
            raise DataFormatError(
                path,
                1,
                f"score {unnamed_header!r} is not a number (the only line, so not a header: a header names its "
                "columns sentence1, sentence2, score)",
            )
        raise InputError(f"{path} holds no sentence pairs")
    return StsDataset(first1, first2, scores, path, path.stem)


# -- online sources -------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$BGEKIT_CACHE`` or ``~/.cache/bgekit``."""
    return Path(os.environ.get("BGEKIT_CACHE") or Path.home() / ".cache" / "bgekit").expanduser()


def download_beir(name: str, cache_dir: str | Path | None = None, url: str | None = None) -> Path:
    """Download and unpack a BEIR zip once; returns the dataset folder (``<cache>/datasets/<name>``).

    ``url`` overrides the official address (any URL ``urllib`` opens, ``file://`` included). With
    ``HF_HUB_OFFLINE`` set, only what the cache already holds (or a ``file://`` URL) is read.
    """
    root = Path(cache_dir or default_cache_dir() / "datasets").expanduser()
    target = root / name
    if _has_corpus(target) or _nested_datasets(target):
        return target
    url = url or BEIR_URL.format(name=name)
    missing = f"BEIR dataset {name!r} is not in {target}"
    instead = f"pass the dataset's folder (the unpacked {name}.zip) instead of its name"
    if _offline() and urllib.parse.urlparse(url).scheme not in ("", "file"):
        raise InputError(f"{missing}, and HF_HUB_OFFLINE is set: no download from {url}; {instead}")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}.") as tmp:
        archive = Path(tmp) / f"{name}.zip"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, archive.open("wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            raise InputError(f"{missing} and could not be downloaded from {url} ({exc}); {instead}") from None
        try:
            with zipfile.ZipFile(archive) as bundle:
                bundle.extractall(Path(tmp) / "unpacked")
        except zipfile.BadZipFile:
            raise InputError(f"{url} is not a zip archive") from None
        unpacked = Path(tmp) / "unpacked"
        inner = unpacked / name if (unpacked / name).is_dir() else unpacked
        if not _has_corpus(inner) and not _nested_datasets(inner):
            raise InputError(f"{url} holds no corpus.jsonl: not a BEIR dataset archive")
        os.replace(inner, target)
    logger.info("downloaded BEIR dataset %s to %s", name, target)
    return target


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` set (as huggingface_hub reads it), read at each call: no dataset downloads either,
    as in Hugging Face's ``datasets`` (a BEIR zip is fetched from its own site, not the hub)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def download_hf_dataset(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Fetch a Hugging Face dataset repository that holds BEIR files (``mteb/scifact``)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                repo_id,
                repo_type="dataset",
                revision=revision,
                cache_dir=str(cache_dir) if cache_dir else None,
                allow_patterns=["*.jsonl", "*.jsonl.gz", "qrels/*", "*.tsv", "*.md"],
            )
        )
    except Exception as exc:  # network, auth, missing repo: all mean "not available here"
        raise InputError(
            f"could not get dataset {repo_id!r} from the Hugging Face hub ({type(exc).__name__}); "
            "offline, pass a local dataset folder"
        ) from None
    if not any((folder / f).exists() for f in ("corpus.jsonl", "corpus.jsonl.gz")):
        raise InputError(
            f"dataset {repo_id!r} (revision {revision or 'main'}) has no BEIR files (corpus.jsonl, queries.jsonl, "
            "qrels/<split>.tsv); MTEB's retrieval datasets have them at the revisions its results name"
        )
    return folder


def write_beir(dataset: RetrievalDataset, folder: str | Path) -> Path:
    """Write a dataset in the BEIR layout (titles are already joined into the text)."""
    folder = Path(folder)
    io.write_jsonl(
        folder / "corpus.jsonl",
        ({"_id": i, "title": "", "text": t} for i, t in zip(dataset.corpus_ids, dataset.corpus_texts, strict=True)),
    )
    io.write_jsonl(folder / "queries.jsonl", ({"_id": q, "text": t} for q, t in dataset.queries.items()))

    def qrels(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write("query-id\tcorpus-id\tscore\n")
            for query_id, docs in dataset.qrels.items():
                for doc_id, rel in docs.items():
                    handle.write(f"{query_id}\t{doc_id}\t{rel}\n")

    io.write_with(folder / "qrels" / f"{dataset.split}.tsv", qrels)
    return folder


def dataset_json(dataset: RetrievalDataset) -> dict[str, Any]:
    """A small description for reports."""
    return {
        "name": dataset.name,
        "path": str(dataset.path) if dataset.path else None,
        "layout": dataset.layout,
        "split": dataset.split,
        "documents": len(dataset.corpus_ids),
        "queries": len(dataset.queries),
        "judgments": dataset.n_judgments,
        "problems": dict(dataset.problems),
        "corpus_sha256": dataset.fingerprint(),
        **({"excluded": sum(len(docs) for docs in dataset.excluded.values())} if dataset.excluded else {}),
        **({"answers": sum(len(a) for a in dataset.answers.values())} if dataset.answers else {}),
    }


__all__ = [
    "BEIR_DATASETS",
    "CQADUPSTACK_FORUMS",
    "RetrievalDataset",
    "StsDataset",
    "available_splits",
    "cqadupstack_forums",
    "dataset_json",
    "download_beir",
    "download_hf_dataset",
    "is_dataset_name",
    "load_local_dataset",
    "load_retrieval_dataset",
    "load_sts",
    "resolve_dataset",
    "write_beir",
]
