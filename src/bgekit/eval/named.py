"""FlagEmbedding's named evaluation sets: MIRACL, MLDR, MS MARCO passage ranking, MKQA and BRIGHT, by name.

``miracl/LANG``, ``mldr/LANG``, ``msmarco-passage`` (``msmarco/passage`` too), ``mkqa/LANG``, ``bright/TASK`` and
``bright-long/TASK`` name the datasets that FlagEmbedding 1.4.2's runners evaluate (``python -m
FlagEmbedding.evaluation.miracl --dataset_names LANG --splits dev``, ``...mldr``, ``...msmarco --dataset_names
passage --splits dev dl19 dl20``, ``...mkqa --dataset_names LANG --splits test``, ``...bright --task_type
short|long --dataset_names TASK --splits examples``),
from the same sources:

- **MIRACL** (18 languages; splits ``dev``, and ``train`` except for ``de`` and ``yo``): the corpus is the
  ``miracl/miracl-corpus`` hub dataset (``miracl-corpus-v1.0-LANG/docs-N.jsonl.gz``: ``docid``, ``title``,
  ``text``), the queries and judgments the TSV files of ``miracl/miracl``
  (``miracl-v1.0-LANG/topics/topics.miracl-v1.0-LANG-SPLIT.tsv``: ``qid<TAB>query``;
  ``.../qrels/qrels.miracl-v1.0-LANG-SPLIT.tsv``: ``qid<TAB>Q0<TAB>docid<TAB>grade``).
- **MLDR** (13 languages; splits ``train``, ``dev``, ``test``): the ``Shitao/MLDR`` hub dataset
  (``mldr-v1.0-LANG/corpus.jsonl.gz``: ``docid``, ``text``; ``mldr-v1.0-LANG/SPLIT.jsonl.gz``: ``query_id``,
  ``query``, ``positive_passages`` (judged 1), ``negative_passages`` (judged 0)).
- **MS MARCO passage** (splits ``dev``, ``dl19``, ``dl20``): the corpus is ``Tevatron/msmarco-passage-corpus``
  (``corpus.jsonl.gz``: 8,841,823 passages, ``docid``, ``title``, ``text``); ``dev`` is BEIR's queries
  (``BeIR/msmarco``, ``queries.jsonl.gz``) with BEIR's dev judgments (``BeIR/msmarco-qrels``, ``dev.tsv``);
  ``dl19`` / ``dl20`` are the TREC Deep Learning 2019 / 2020 test queries (MS MARCO's
  ``msmarco-test20YY-queries.tsv.gz``) with NIST's graded judgments (``20YYqrels-pass.txt``).
- **MKQA** (26 languages, ``zh_cn``, ``zh_hk``, ``zh_tw`` among them; split ``test``): the corpus is BEIR's
  Natural Questions (``BeIR/nq``, ``corpus.jsonl.gz``: ``_id``, ``title``, ``text``), each text normalized as
  FlagEmbedding's ``normalize_text`` (dashes, quotes, primes, slashes unified, control characters dropped) and
  lower-cased, converted once into ``mkqa/corpus.jsonl`` and linked into each language's folder; the queries and
  their answer strings are ``LANG.jsonl`` in ``Shitao/bge-m3-data``'s ``MKQA_test-data.zip`` (``id``,
  ``question``, ``answers``), written as FlagEmbedding's ``{"qid", "answers"}`` qrels. MKQA is scored by
  ``qa_recall_at_k`` (:func:`bgekit.eval.metrics.evaluate_answers`), not by judged documents.
- **BRIGHT** (12 tasks; ``bright-long``: the 8 with long documents; splits ``examples`` and the five
  ``MODEL_reason`` query sets): the ``xlangai/BRIGHT`` hub dataset's parquet files, ``documents/TASK-*.parquet``
  (or ``long_documents/``: ``id``, ``content``) and ``SPLIT/TASK-*.parquet`` (``id``, ``query``, ``gold_ids``
  (``gold_ids_long``), ``excluded_ids``). Query ids are ``SPLIT-ID``; gold documents are judged 1, excluded
  ones 0 and written to ``SPLIT_excluded.jsonl`` too: the evaluation never ranks them for that query, as
  FlagEmbedding's BRIGHT searcher drops them. Its runner's per-task query instruction is the dataset's
  default (:attr:`NamedDataset.query_instruction`).

Each is converted once into FlagEmbedding's own local layout (what its runners write into
``--dataset_dir``): ``corpus.jsonl`` (``id``, ``title``, ``text``), ``SPLIT_queries.jsonl`` (``id``,
``text``; only the judged queries of MS MARCO, as FlagEmbedding keeps them) and ``SPLIT_qrels.jsonl``
(``qid``, ``docid``, ``relevance``), under ``<cache>/datasets/miracl/LANG``, ``.../mldr/LANG``,
``.../msmarco-passage``, ``.../bright/TASK`` and ``.../bright-long/TASK``. The files are fetched into
``<cache>/datasets/.downloads/REPO/PATH`` (hub files, with ``huggingface_hub``) or
``.../.downloads/HOST/PATH`` (the others), read from there and removed once
converted; each converted file is written under a temporary name and renamed when complete, so a cached
run reads the converted files and fetches and converts nothing. A split is fetched the first time it is
named; the corpus once. Documents embed as FlagEmbedding embeds them, ``f"{title} {text}".strip()``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import io
from ..errors import DataFormatError, InputError, OutputError
from .datasets import _offline  # HF_HUB_OFFLINE read as for BEIR names (datasets imports this module lazily)

logger = logging.getLogger(__name__)

#: MIRACL's languages (FlagEmbedding's ``MIRACLEvalDataLoader``) and how many ``docs-N.jsonl.gz`` files
#: each corpus is (``miracl/miracl-corpus``'s loading script)
MIRACL_CORPUS_FILES = {
    "ar": 5, "bn": 1, "de": 32, "en": 66, "es": 21, "fa": 5, "fi": 4, "fr": 30, "hi": 2,
    "id": 3, "ja": 14, "ko": 3, "ru": 20, "sw": 1, "te": 2, "th": 2, "yo": 1, "zh": 10,
}  # fmt: skip
MIRACL_LANGUAGES = tuple(sorted(MIRACL_CORPUS_FILES))
MLDR_LANGUAGES = ("ar", "de", "en", "es", "fr", "hi", "it", "ja", "ko", "pt", "ru", "th", "zh")
MSMARCO_PASSAGE_SPLITS = ("dev", "dl19", "dl20")
_MARCO_FILES = "https://msmarco.z22.web.core.windows.net/msmarcoranking"
#: BRIGHT's tasks (FlagEmbedding's ``BrightShortEvalDataLoader``; ``bright-long`` has the first eight) and the
#: per-task query instructions its runner sets by default (``--use_special_instructions True``)
BRIGHT_INSTRUCTIONS = {
    "biology": "Given a Biology post, retrieve relevant passages that help answer the post.",
    "earth_science": "Given an Earth Science post, retrieve relevant passages that help answer the post.",
    "economics": "Given an Economics post, retrieve relevant passages that help answer the post.",
    "psychology": "Given a Psychology post, retrieve relevant passages that help answer the post.",
    "robotics": "Given a Robotics post, retrieve relevant passages that help answer the post.",
    "stackoverflow": "Given a Stack Overflow post, retrieve relevant passages that help answer the post.",
    "sustainable_living": "Given a Sustainable Living post, retrieve relevant passages that help answer the post.",
    "leetcode": "Given a Coding problem, retrieve relevant examples that help answer the problem.",
    "pony": "Given a Pony question, retrieve relevant passages that help answer the question.",
    "aops": "Given a Math problem, retrieve relevant examples that help answer the problem.",
    "theoremqa_questions": "Given a Math problem, retrieve relevant examples that help answer the problem.",
    "theoremqa_theorems": "Given a Math problem, retrieve relevant theorems that help answer the problem.",
}
BRIGHT_LONG_INSTRUCTIONS = {  # "documents" for "passages"; pony's lacks the full stop, as in FlagEmbedding
    task: BRIGHT_INSTRUCTIONS[task].replace("passages", "documents")
    for task in ("biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow",
                 "sustainable_living", "pony")
}  # fmt: skip
BRIGHT_LONG_INSTRUCTIONS["pony"] = BRIGHT_LONG_INSTRUCTIONS["pony"].rstrip(".")
BRIGHT_TASKS = tuple(BRIGHT_INSTRUCTIONS)
BRIGHT_LONG_TASKS = tuple(BRIGHT_LONG_INSTRUCTIONS)
#: BRIGHT's query sets: the posts themselves, or each post with an LLM's reasoning (FlagEmbedding's splits)
BRIGHT_SPLITS = (
    "examples", "Gemini-1.0_reason", "claude-3-opus_reason", "gpt4_reason", "grit_reason", "llama3-70b_reason",
)  # fmt: skip
_BRIGHT_REPO = "xlangai/BRIGHT"  # FlagEmbedding spells it xlangai/bright: the same hub repository
#: MKQA's languages (FlagEmbedding's ``MKQAEvalDataLoader``): each a query set over one English corpus
MKQA_LANGUAGES = (
    "en", "ar", "fi", "ja", "ko", "ru", "es", "sv", "he", "th", "da", "de", "fr", "it", "nl", "pl", "pt", "hu", "vi",
    "ms", "km", "no", "tr", "zh_cn", "zh_hk", "zh_tw",
)  # fmt: skip
#: FlagEmbedding's MKQA corpus text normalization (its ``normalize_text``, after chemdataextractor): dropped
#: control characters, unified dashes, quotes, primes, slashes; applied before lower-casing
_MKQA_CHARS = str.maketrans({
    **dict.fromkeys("\u0001\u0002\u0003\u0004\u0005\u0006\u0007\u0008\u000e\u000f\u0011\u0012\u0013\u0014"
                    "\u0015\u0016\u0017\u0018\u0019\u001a\u001b\u00ad", ""),
    **dict.fromkeys("\u000b\u000c\u0085", " "),
    **dict.fromkeys("-\u2010\u2011\u2043\u2012\u2013\u2014\u2015\u2212\uff0d\u207b", "-"),
    **dict.fromkeys('"\u201c\u201d\u201e\u201f', '"'),
    **dict.fromkeys("'\u2018\u2019\u201a\u201b\u055a\ua78b\ua78c\uff07`\u00b4\u2032\u2035", "'"),
    "\u2033": "''", "\u2036": "''", "\u2034": "'''", "\u2037": "'''", "\u2057": "''''", "\u2026": "...",
    **dict.fromkeys("/\u2044\u2215", "/"),
})  # fmt: skip


@dataclass(frozen=True)
class Remote:
    """One file a named dataset is made from: ``path`` in the hub dataset ``repo``, or a URL (``repo`` None).
    A hub ``path`` with ``*`` names the files it matches (a parquet split however many shards it is in)."""

    repo: str | None
    path: str

    @property
    def pattern(self) -> bool:
        return self.repo is not None and "*" in self.path

    def files(self, root: Path) -> list[Path]:
        """The fetched file(s), in name order; none when not (yet) there."""
        if self.pattern:
            return sorted(p for p in (root / ".downloads" / self.repo).glob(self.path) if p.is_file())
        return [self.local(root)] if self.local(root).is_file() else []

    @property
    def url(self) -> str:
        if self.repo is None:
            return self.path
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return f"{endpoint}/datasets/{self.repo}/resolve/main/{self.path}"

    def local(self, root: Path) -> Path:
        """Where the fetched file lies (and where a copy placed by hand is read from)."""
        if self.repo is not None:
            return root / ".downloads" / self.repo / self.path
        url = urllib.parse.urlparse(self.path)
        return root / ".downloads" / url.netloc / url.path.lstrip("/")


@dataclass(frozen=True)
class NamedDataset:
    """``miracl/LANG``, ``mldr/LANG``, ``msmarco-passage``, ``bright/TASK`` or ``bright-long/TASK``: where it
    comes from and how it converts."""

    family: str  # "miracl", "mldr", "msmarco-passage", "bright" or "bright-long"
    language: str | None = None  # the language, or BRIGHT's task

    @property
    def bright(self) -> bool:
        return self.family in ("bright", "bright-long")

    def shared_corpus(self, root: Path) -> Path | None:
        """Where a corpus every language shares is converted once (MKQA's: ``mkqa/corpus.jsonl``, FlagEmbedding's
        ``--dataset_dir`` layout); each language's folder gets a link to it. None for the others."""
        return root / "mkqa" / "corpus.jsonl" if self.family == "mkqa" else None

    @property
    def query_instruction(self) -> str | None:
        """The query instruction FlagEmbedding's runner sets for this dataset (BRIGHT's per task), else None."""
        if self.family == "bright":
            return BRIGHT_INSTRUCTIONS[self.language]
        if self.family == "bright-long":
            return BRIGHT_LONG_INSTRUCTIONS[self.language]
        return None

    @property
    def name(self) -> str:
        return f"{self.family}/{self.language}" if self.language else self.family

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits FlagEmbedding 1.4.2 evaluates (its ``available_splits``)."""
        if self.family == "miracl":
            return ("dev",) if self.language in ("de", "yo") else ("dev", "train")
        if self.family == "mldr":
            return ("test", "dev", "train")
        if self.bright:
            return BRIGHT_SPLITS
        if self.family == "mkqa":
            return ("test",)
        return MSMARCO_PASSAGE_SPLITS

    def folder(self, root: Path) -> Path:
        return root / self.family / self.language if self.language else root / self.family

    def corpus_sources(self) -> list[Remote]:
        lang = self.language
        if self.family == "miracl":
            count = MIRACL_CORPUS_FILES[lang]
            return [
                Remote("miracl/miracl-corpus", f"miracl-corpus-v1.0-{lang}/docs-{n}.jsonl.gz") for n in range(count)
            ]
        if self.family == "mldr":
            return [Remote("Shitao/MLDR", f"mldr-v1.0-{lang}/corpus.jsonl.gz")]
        if self.bright:
            config = "documents" if self.family == "bright" else "long_documents"
            return [Remote(_BRIGHT_REPO, f"{config}/{lang}-*.parquet")]
        if self.family == "mkqa":  # BEIR's Natural Questions corpus, as the bge-m3 paper's MKQA runs
            return [Remote("BeIR/nq", "corpus.jsonl.gz")]
        return [Remote("Tevatron/msmarco-passage-corpus", "corpus.jsonl.gz")]

    def split_sources(self, split: str) -> list[Remote]:
        """The files of ``split``: ``[queries, qrels]`` (MLDR, BRIGHT: one file holds both)."""
        lang = self.language
        if self.bright:
            return [Remote(_BRIGHT_REPO, f"{split}/{lang}-*.parquet")]
        if self.family == "mkqa":  # every language's LANG.jsonl in one zip, kept for the other languages
            return [Remote("Shitao/bge-m3-data", "MKQA_test-data.zip")]
        if self.family == "miracl":
            stem = f"miracl-v1.0-{lang}"
            return [
                Remote("miracl/miracl", f"{stem}/topics/topics.{stem}-{split}.tsv"),
                Remote("miracl/miracl", f"{stem}/qrels/qrels.{stem}-{split}.tsv"),
            ]
        if self.family == "mldr":
            return [Remote("Shitao/MLDR", f"mldr-v1.0-{lang}/{split}.jsonl.gz")]
        if split == "dev":
            return [Remote("BeIR/msmarco", "queries.jsonl.gz"), Remote("BeIR/msmarco-qrels", "dev.tsv")]
        year = "2019" if split == "dl19" else "2020"
        return [
            Remote(None, f"{_MARCO_FILES}/msmarco-test{year}-queries.tsv.gz"),
            Remote(None, f"https://trec.nist.gov/data/deep/{year}qrels-pass.txt"),
        ]

    def read_corpus(self, files: list[Path]) -> Iterator[dict[str, str]]:
        if self.bright:  # {"id", "content"}; FlagEmbedding reads it back with title "": the text stripped
            for path, row, obj in _parquet_rows(files, ["id", "content"]):
                yield _document(_field(obj, "id", path, row), "", _text(obj, "content", path, row))
            return
        if self.family == "mkqa":  # BEIR's {"_id", "title", "text"}, normalized and lower-cased as FlagEmbedding
            for path in files:
                for line, obj in io.read_jsonl(path):
                    title, text = (_mkqa_normalize(_text(obj, key, path, line, "")) for key in ("title", "text"))
                    yield _document(_field(obj, "_id", path, line), title, text)
            return
        for path in files:
            for line, obj in io.read_jsonl(path):
                doc_id = _field(obj, "docid", path, line)
                yield _document(doc_id, _text(obj, "title", path, line, ""), _text(obj, "text", path, line))

    def read_split(
        self, files: list[list[Path]], split: str
    ) -> tuple[dict[str, str], dict[str, Any], dict[str, list[str]]]:
        """Queries, judgments (MKQA: each query's answer strings) and (BRIGHT) each query's excluded documents
        of one split as FlagEmbedding's loaders read them (ids as strings, a later judgment of the same pair
        replacing an earlier one, as its dicts do). ``files`` are each source's files (:meth:`Remote.files`), in
        :meth:`split_sources` order."""
        if self.bright:
            return _read_bright_split(files[0], split, long=self.family == "bright-long")
        if self.family == "mkqa":
            return (*_read_mkqa_split(files[0][0], self.language), {})
        first = files[0][0]
        if self.family == "mldr":
            return (*_read_mldr_split(first), {})
        second = files[1][0]
        if self.family == "miracl":
            return _read_tsv_queries(first), _read_trec_qrels(second, tabs=True), {}
        if second.suffix == ".tsv":  # dev: BEIR's files
            qrels = _read_beir_qrels(second)
            return _read_jsonl_queries(first, keep=qrels), qrels, {}
        qrels = _read_trec_qrels(second, tabs=False)
        return _read_tsv_queries(first, keep=qrels), qrels, {}


def named_dataset(name: str | Path) -> NamedDataset | None:
    """The named set ``name`` reads as (``miracl/ar``, ``MLDR/de``, ``msmarco-passage``, ``bright/pony``,
    ``bright-long/pony``), None when it names none; an :class:`InputError` listing the languages (tasks) when
    it names a family without one or with another."""
    text = str(name).strip().rstrip("/").lower()
    family, _, rest = text.partition("/")
    if text in ("msmarco-passage", "msmarco/passage"):
        return NamedDataset("msmarco-passage")
    if family == "msmarco" and rest:
        raise InputError(
            f"{name!r}: of FlagEmbedding's MS MARCO sets bgekit fetches the passage ranking, as msmarco-passage "
            f"(splits {', '.join(MSMARCO_PASSAGE_SPLITS)}); msmarco alone is BEIR's"
        )
    family = {"bright_long": "bright-long"}.get(family, family)
    languages = {
        "miracl": MIRACL_LANGUAGES, "mldr": MLDR_LANGUAGES, "mkqa": MKQA_LANGUAGES, "bright": BRIGHT_TASKS,
        "bright-long": BRIGHT_LONG_TASKS,
    }.get(family)  # fmt: skip
    if languages is None:
        return None
    if rest not in languages:
        part = "TASK" if family.startswith("bright") else "LANG"
        word = {"TASK": "task", "LANG": "language"}[part]
        what = f"has no {word} {rest!r}" if rest else f"is {len(languages)} datasets, one a {word}"
        also = ""
        if family == "bright-long" and rest in BRIGHT_TASKS:
            also = f" ({rest} has no long documents: bright/{rest} is its passages)"
        raise InputError(f"{family} {what}{also}: {family}/{part} names one, {part} one of {', '.join(languages)}")
    return NamedDataset(family, rest)


def resolve_named(dataset: NamedDataset, root: Path, split: str | None = None) -> Path:
    """The folder of ``dataset`` in FlagEmbedding's layout with its corpus and, when given, ``split``:
    fetched and converted the first time, read as it is after that."""
    if split is not None and split not in dataset.splits:
        default = {"miracl": "dev", "mldr": "test", "msmarco-passage": "dev", "mkqa": "test"}.get(
            dataset.family, "examples"
        )
        raise InputError(
            f"{dataset.name} has no split {split!r}; its splits: {', '.join(dataset.splits)} (FlagEmbedding "
            f"evaluates {dataset.family} on {default}: --split {default})"
        )
    folder = dataset.folder(root)
    shared = dataset.shared_corpus(root)
    if shared is not None and shared.is_file() and not (folder / "corpus.jsonl").is_file():
        _link(shared, folder / "corpus.jsonl")
    corpus = shared or folder / "corpus.jsonl"
    split_files = [folder / f"{split}_queries.jsonl", folder / f"{split}_qrels.jsonl"] if split else []
    needed = ([] if corpus.is_file() else dataset.corpus_sources()) + (
        dataset.split_sources(split) if split and not all(p.is_file() for p in split_files) else []
    )
    if not needed:
        return folder
    what = f"{dataset.name} ({split})" if split else dataset.name
    missing = f"dataset {dataset.name!r}{f' (split {split})' if split else ''} is not in {folder}"
    layout = f"corpus.jsonl, {split or 'SPLIT'}_queries.jsonl, {split or 'SPLIT'}_qrels.jsonl"
    instead = f"pass the dataset's folder ({layout}: FlagEmbedding's layout) instead of its name"
    absent = [remote for remote in needed if not remote.files(root)]
    if absent and _offline():
        raise InputError(f"{missing}, and HF_HUB_OFFLINE is set: no download from {absent[0].url}; {instead}")
    for remote in absent:
        _download(remote, root, f"{missing} and could not be downloaded from {remote.url}", instead)
    if not corpus.is_file():
        files = [path for remote in dataset.corpus_sources() for path in remote.files(root)]
        logger.info("converting the %s corpus into %s", dataset.name, corpus)
        io.write_jsonl(corpus, dataset.read_corpus(files))
        _remove(files)
        if shared is not None:
            _link(shared, folder / "corpus.jsonl")
    if split and not all(p.is_file() for p in split_files):
        sources = [remote.files(root) for remote in dataset.split_sources(split)]
        queries, qrels, excluded = dataset.read_split(sources, split)
        if dataset.family == "mkqa":  # FlagEmbedding's MKQA qrels: each query's answers
            rows = [{"qid": q, "answers": answers} for q, answers in qrels.items()]
        else:
            rows = [{"qid": q, "docid": d, "relevance": r} for q, docs in qrels.items() for d, r in docs.items()]
        writes = [
            (split_files[0], io.jsonl_writer(split_files[0], ({"id": q, "text": t} for q, t in queries.items()))),
            (split_files[1], io.jsonl_writer(split_files[1], rows)),
        ]
        if excluded:  # BRIGHT: never ranked for that query (FlagEmbedding drops them from the search results)
            target = folder / f"{split}_excluded.jsonl"
            writes.append((target, io.jsonl_writer(target, _excluded_rows(excluded))))
        io.write_together(writes)
        if dataset.family != "mkqa":  # MKQA's zip holds every language's queries
            _remove(path for files in sources for path in files)
    logger.info("%s is in %s", what, folder)
    return folder


def _link(shared: Path, target: Path) -> None:
    """``target`` as a hard link to ``shared`` (a copy where links cannot be made), put in place atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        staged = Path(tmp) / target.name
        try:
            os.link(shared, staged)
        except OSError:
            shutil.copyfile(shared, staged)
        os.replace(staged, target)


def _excluded_rows(excluded: dict[str, list[str]]) -> Iterator[dict[str, str]]:
    for query_id, doc_ids in excluded.items():
        for doc_id in doc_ids:
            yield {"qid": query_id, "docid": doc_id}


def _download(remote: Remote, root: Path, failed: str, instead: str) -> None:
    target = remote.local(root)
    if remote.repo is not None:
        from huggingface_hub import hf_hub_download, snapshot_download

        local_dir = root / ".downloads" / remote.repo
        try:
            if remote.pattern:
                snapshot_download(remote.repo, repo_type="dataset", allow_patterns=[remote.path], local_dir=local_dir)
            else:
                hf_hub_download(remote.repo, remote.path, repo_type="dataset", local_dir=local_dir)
        except Exception as exc:  # network, a gated repository without access, a missing file
            detail = (str(exc).strip().splitlines() or [""])[0]
            hint = ""
            if type(exc).__name__ == "GatedRepoError":
                hint = f"; it is gated: accept its terms at https://huggingface.co/datasets/{remote.repo} and log in"
            raise InputError(f"{failed} ({type(exc).__name__}: {detail}){hint}; {instead}") from None
        if not remote.files(root):
            raise InputError(f"{failed} (no file in {remote.repo} matches {remote.path}); {instead}")
        return
    try:  # a full disk is io's OutputError naming the file; a network failure is an OSError
        with (
            io.atomic_path(target) as partial,
            urllib.request.urlopen(remote.url, timeout=60) as response,
            partial.open("wb") as out,
        ):
            shutil.copyfileobj(response, out)
    except OutputError:
        raise
    except OSError as exc:
        raise InputError(f"{failed} ({exc}); {instead}") from None


def _remove(files: Iterable[Path]) -> None:
    """Fetched files are removed once converted (the converted copy is what later runs read)."""
    for path in files:
        path.unlink(missing_ok=True)


def _field(obj: dict[str, Any], key: str, path: Path, line: int) -> str:
    if key not in obj or obj[key] is None or isinstance(obj[key], (dict, list)):
        raise DataFormatError(path, line, f"missing the {key!r} field (keys: {sorted(obj)})")
    return str(obj[key])


def _text(obj: dict[str, Any], key: str, path: Path, line: int, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise DataFormatError(path, line, f"{key!r} must be a string, got {value!r}")
    return value


def _document(doc_id: str, title: str, text: str) -> dict[str, str]:
    """A corpus record that embeds as FlagEmbedding's ``f"{title} {text}".strip()``: bgekit joins a title
    the same way and takes a text without one as it is, so such a text is stored stripped."""
    return {"id": doc_id, "title": title, "text": text} if title else {"id": doc_id, "text": text.strip()}


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines, stripped at both ends (FlagEmbedding's ``line.strip().split(...)``)."""
    for number, raw in io.numbered_lines(path):
        if raw.strip():
            yield number, raw.strip()


def _read_tsv_queries(path: Path, keep: dict | None = None) -> dict[str, str]:
    queries: dict[str, str] = {}
    for number, line in _lines(path):
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataFormatError(path, number, f"expected 2 tab-separated columns (qid, query), found {len(parts)}")
        if keep is None or parts[0] in keep:
            queries[parts[0]] = parts[1]
    return queries


def _read_jsonl_queries(path: Path, keep: dict) -> dict[str, str]:
    queries: dict[str, str] = {}
    for line, obj in io.read_jsonl(path):
        query_id = _field(obj, "_id", path, line)
        if query_id in keep:
            queries[query_id] = _text(obj, "text", path, line)
    return queries


def _read_trec_qrels(path: Path, tabs: bool) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for number, line in _lines(path):
        parts = line.split("\t") if tabs else line.split()
        if len(parts) != 4:
            raise DataFormatError(path, number, f"expected 4 columns (qid, Q0, docid, relevance), found {len(parts)}")
        qrels.setdefault(parts[0], {})[parts[2]] = _grade(parts[3], path, number)
    return qrels


def _read_beir_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for number, line in _lines(path):
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataFormatError(path, number, f"expected 3 tab-separated columns, found {len(parts)}")
        if number == 1 and parts[0] == "query-id":
            continue
        qrels.setdefault(parts[0], {})[parts[1]] = _grade(parts[2], path, number)
    return qrels


def _read_mldr_split(path: Path) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for line, obj in io.read_jsonl(path):
        query_id = _field(obj, "query_id", path, line)
        queries[query_id] = _text(obj, "query", path, line)
        judged = qrels.setdefault(query_id, {})
        for key, grade in (("positive_passages", 1), ("negative_passages", 0)):
            for passage in obj.get(key) or []:
                judged[_field(passage, "docid", path, line)] = grade
    return queries, {q: docs for q, docs in qrels.items() if docs}


def _parquet_rows(files: list[Path], columns: list[str]) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """``(file, row number from 1, {column: value})`` of the hub's parquet files, in order."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("BRIGHT's files are parquet: reading them needs pyarrow: pip install 'bgekit[eval]'") from None
    for path in files:
        try:
            table = pq.ParquetFile(path)
            missing = [c for c in columns if c not in table.schema_arrow.names]
            if missing:
                raise DataFormatError(path, None, f"no column {missing[0]!r} (columns: {table.schema_arrow.names})")
            row = 0
            for batch in table.iter_batches(columns=columns, batch_size=4096):
                for obj in batch.to_pylist():
                    row += 1
                    yield path, row, obj
        except OSError as exc:  # pyarrow's ArrowInvalid (not parquet, truncated) is a ValueError
            raise DataFormatError(path, None, f"not a readable parquet file ({exc})") from None
        except ValueError as exc:
            if isinstance(exc, DataFormatError):
                raise
            raise DataFormatError(path, None, f"not a readable parquet file ({exc})") from None


def _mkqa_normalize(text: str) -> str:
    """FlagEmbedding's MKQA corpus text: its ``normalize_text``, then lower-cased."""
    return text.translate(_MKQA_CHARS).replace(" . . . ", " ... ").lower()


def _read_mkqa_split(archive: Path, language: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``LANG.jsonl`` of FlagEmbedding's MKQA zip (``{"id", "question", "answers"}``): the queries and each
    one's answer strings (MKQA is judged by answers found in the retrieved text, not by document ids)."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [n for n in bundle.namelist() if n.rsplit("/", 1)[-1] == f"{language}.jsonl"]
            if not members:
                raise DataFormatError(archive, None, f"holds no {language}.jsonl")
            lines = bundle.read(min(members, key=len)).decode("utf-8").splitlines()
    except zipfile.BadZipFile:
        raise DataFormatError(archive, None, "not a zip archive") from None
    where = archive / min(members, key=len)
    queries: dict[str, str] = {}
    answers: dict[str, list[str]] = {}
    for line, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        obj = io.parse_json_line(where, line, raw)
        query_id = _field(obj, "id", where, line)
        queries[query_id] = _text(obj, "question", where, line)
        given = obj.get("answers")
        if not isinstance(given, list) or not all(isinstance(a, str) for a in given):
            raise DataFormatError(where, line, f"'answers' must be a list of strings, got {given!r}")
        answers[query_id] = given
    return queries, answers


def _read_bright_split(
    files: list[Path], split: str, long: bool
) -> tuple[dict[str, str], dict[str, dict[str, int]], dict[str, list[str]]]:
    """BRIGHT's examples as FlagEmbedding's loaders read them: query ids ``SPLIT-ID``, the gold documents
    (``gold_ids``, or ``gold_ids_long`` for the long documents) judged 1, the ``excluded_ids`` (but ``N/A``)
    judged 0 and kept apart as the documents never ranked for that query."""
    gold_key = "gold_ids_long" if long else "gold_ids"
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    excluded: dict[str, list[str]] = {}
    for path, row, obj in _parquet_rows(files, ["id", "query", gold_key, "excluded_ids"]):
        query_id = f"{split}-{_field(obj, 'id', path, row)}"
        queries[query_id] = _text(obj, "query", path, row)
        judged = qrels.setdefault(query_id, {})
        for doc_id in obj.get(gold_key) or []:
            judged[str(doc_id)] = 1
        dropped = [str(d) for d in dict.fromkeys(obj.get("excluded_ids") or []) if str(d) != "N/A"]
        for doc_id in dropped:
            if judged.get(doc_id) == 1:  # FlagEmbedding's loader stops on it too (an assert)
                raise DataFormatError(path, row, f"query {query_id!r} excludes its own gold document {doc_id!r}")
            judged[doc_id] = 0
        if dropped:
            excluded[query_id] = dropped
    return queries, {q: docs for q, docs in qrels.items() if docs}, excluded


def _grade(value: str, path: Path, line: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataFormatError(path, line, f"relevance {value!r} is not a whole number") from None


__all__ = [
    "BRIGHT_LONG_TASKS",
    "BRIGHT_SPLITS",
    "BRIGHT_TASKS",
    "MIRACL_LANGUAGES",
    "MKQA_LANGUAGES",
    "MLDR_LANGUAGES",
    "MSMARCO_PASSAGE_SPLITS",
    "NamedDataset",
    "named_dataset",
    "resolve_named",
]
