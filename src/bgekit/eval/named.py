"""FlagEmbedding's named evaluation sets: MIRACL, MLDR and MS MARCO passage ranking, by name.

``miracl/LANG``, ``mldr/LANG`` and ``msmarco-passage`` (``msmarco/passage`` too) name the datasets that
FlagEmbedding 1.4.2's runners evaluate (``python -m FlagEmbedding.evaluation.miracl --dataset_names LANG
--splits dev``, ``...mldr``, ``...msmarco --dataset_names passage --splits dev dl19 dl20``), from the same
sources:

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

Each is converted once into FlagEmbedding's own local layout (what its runners write into
``--dataset_dir``): ``corpus.jsonl`` (``id``, ``title``, ``text``), ``SPLIT_queries.jsonl`` (``id``,
``text``; only the judged queries of MS MARCO, as FlagEmbedding keeps them) and ``SPLIT_qrels.jsonl``
(``qid``, ``docid``, ``relevance``), under ``<cache>/datasets/miracl/LANG``, ``.../mldr/LANG`` and
``.../msmarco-passage``. The files are fetched into ``<cache>/datasets/.downloads/REPO/PATH`` (hub files,
with ``huggingface_hub``) or ``.../.downloads/HOST/PATH`` (the others), read from there and removed once
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import io
from ..errors import DataFormatError, InputError
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


@dataclass(frozen=True)
class Remote:
    """One file a named dataset is made from: ``path`` in the hub dataset ``repo``, or a URL (``repo`` None)."""

    repo: str | None
    path: str

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
    """``miracl/LANG``, ``mldr/LANG`` or ``msmarco-passage``: where it comes from and how it converts."""

    family: str  # "miracl", "mldr" or "msmarco-passage"
    language: str | None = None

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
        return [Remote("Tevatron/msmarco-passage-corpus", "corpus.jsonl.gz")]

    def split_sources(self, split: str) -> list[Remote]:
        """The files of ``split``: ``[queries, qrels]`` (MLDR: one file holds both)."""
        lang = self.language
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
        for path in files:
            for line, obj in io.read_jsonl(path):
                doc_id = _field(obj, "docid", path, line)
                yield _document(doc_id, _text(obj, "title", path, line, ""), _text(obj, "text", path, line))

    def read_split(self, files: list[Path]) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
        """Queries and judgments of one split as FlagEmbedding's loaders read them (ids as strings, a
        later judgment of the same pair replacing an earlier one, as its dicts do)."""
        if self.family == "mldr":
            return _read_mldr_split(files[0])
        if self.family == "miracl":
            return _read_tsv_queries(files[0]), _read_trec_qrels(files[1], tabs=True)
        if files[1].suffix == ".tsv":  # dev: BEIR's files
            qrels = _read_beir_qrels(files[1])
            return _read_jsonl_queries(files[0], keep=qrels), qrels
        qrels = _read_trec_qrels(files[1], tabs=False)
        return _read_tsv_queries(files[0], keep=qrels), qrels


def named_dataset(name: str | Path) -> NamedDataset | None:
    """The named set ``name`` reads as (``miracl/ar``, ``MLDR/de``, ``msmarco-passage``), None when it names
    none; an :class:`InputError` listing the languages when it names a family without one or with another."""
    text = str(name).strip().rstrip("/").lower()
    family, _, rest = text.partition("/")
    if text in ("msmarco-passage", "msmarco/passage"):
        return NamedDataset("msmarco-passage")
    if family == "msmarco" and rest:
        raise InputError(
            f"{name!r}: of FlagEmbedding's MS MARCO sets bgekit fetches the passage ranking, as msmarco-passage "
            f"(splits {', '.join(MSMARCO_PASSAGE_SPLITS)}); msmarco alone is BEIR's"
        )
    languages = {"miracl": MIRACL_LANGUAGES, "mldr": MLDR_LANGUAGES}.get(family)
    if languages is None:
        return None
    if rest not in languages:
        what = f"has no language {rest!r}" if rest else f"is {len(languages)} datasets, one a language"
        raise InputError(f"{family} {what}: {family}/LANG names one, LANG one of {', '.join(languages)}")
    return NamedDataset(family, rest)


def resolve_named(dataset: NamedDataset, root: Path, split: str | None = None) -> Path:
    """The folder of ``dataset`` in FlagEmbedding's layout with its corpus and, when given, ``split``:
    fetched and converted the first time, read as it is after that."""
    if split is not None and split not in dataset.splits:
        default = {"miracl": "dev", "mldr": "test", "msmarco-passage": "dev"}[dataset.family]
        raise InputError(
            f"{dataset.name} has no split {split!r}; its splits: {', '.join(dataset.splits)} (FlagEmbedding "
            f"evaluates {dataset.family} on {default}: --split {default})"
        )
    folder = dataset.folder(root)
    corpus = folder / "corpus.jsonl"
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
    absent = [remote for remote in needed if not remote.local(root).is_file()]
    if absent and _offline():
        raise InputError(f"{missing}, and HF_HUB_OFFLINE is set: no download from {absent[0].url}; {instead}")
    for remote in absent:
        _download(remote, root, f"{missing} and could not be downloaded from {remote.url}", instead)
    if not corpus.is_file():
        files = [remote.local(root) for remote in dataset.corpus_sources()]
        logger.info("converting the %s corpus into %s", dataset.name, corpus)
        io.write_jsonl(corpus, dataset.read_corpus(files))
        _remove(files)
    if split and not all(p.is_file() for p in split_files):
        files = [remote.local(root) for remote in dataset.split_sources(split)]
        queries, qrels = dataset.read_split(files)
        rows = [{"qid": q, "docid": d, "relevance": r} for q, docs in qrels.items() for d, r in docs.items()]
        io.write_together([
            (split_files[0], io.jsonl_writer(split_files[0], ({"id": q, "text": t} for q, t in queries.items()))),
            (split_files[1], io.jsonl_writer(split_files[1], rows)),
        ])  # fmt: skip
        _remove(files)
    logger.info("%s is in %s", what, folder)
    return folder


def _download(remote: Remote, root: Path, failed: str, instead: str) -> None:
    target = remote.local(root)
    if remote.repo is not None:
        from huggingface_hub import hf_hub_download

        try:
            hf_hub_download(remote.repo, remote.path, repo_type="dataset", local_dir=root / ".downloads" / remote.repo)
        except Exception as exc:  # network, a gated repository without access, a missing file
            detail = (str(exc).strip().splitlines() or [""])[0]
            hint = ""
            if type(exc).__name__ == "GatedRepoError":
                hint = f"; it is gated: accept its terms at https://huggingface.co/datasets/{remote.repo} and log in"
            raise InputError(f"{failed} ({type(exc).__name__}: {detail}){hint}; {instead}") from None
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        partial = Path(tmp) / target.name
        try:
            with urllib.request.urlopen(remote.url, timeout=60) as response, partial.open("wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            raise InputError(f"{failed} ({exc}); {instead}") from None
        os.replace(partial, target)


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


def _grade(value: str, path: Path, line: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataFormatError(path, line, f"relevance {value!r} is not a whole number") from None


__all__ = [
    "MIRACL_LANGUAGES",
    "MLDR_LANGUAGES",
    "MSMARCO_PASSAGE_SPLITS",
    "NamedDataset",
    "named_dataset",
    "resolve_named",
]
