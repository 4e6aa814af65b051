"""Training data: the JSONL schema, its validation, and group sampling.

One record a line (or one JSON array of records in a ``.json`` file, as FlagEmbedding reads it):
``{"query": str, "pos": [str, ...], "neg": [str, ...]}`` with optional
``pos_scores`` / ``neg_scores`` (teacher scores, one per passage), ``prompt`` (a per-record
query instruction, in place of ``query_instruction_for_retrieval`` when that is set) and ``type``.
Any other field (``id``, metadata) is kept as it was and written back by :func:`write_records`, as
FlagEmbedding's scripts keep the whole JSON object. The whole file is validated before training
starts, and every error names the file and line.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import math
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataFormatError, InputError
from ..io import line_text, numbered_raw_lines, parse_json_line, read_jsonl

logger = logging.getLogger(__name__)


@dataclass
class TrainRecord:
    """One validated training example."""

    query: str
    pos: list[str]
    neg: list[str]
    pos_scores: list[float] | None = None
    neg_scores: list[float] | None = None
    prompt: str | None = None
    type: str | None = None
    source: str = field(default="", compare=False)
    #: the JSON object the record was read from: its other fields (``id``, metadata) and key order are
    #: written back by :func:`write_records`
    raw: dict[str, Any] | None = field(default=None, compare=False, repr=False)


#: record types whose passages are texts of the query's kind (FlagEmbedding 1.4.2): they get the query's
#: instruction (and, for ICL embedders, the query's ICL layout) instead of the passage instruction
SYMMETRIC_TYPES = ("symmetric_sts", "symmetric_clustering")

#: the fields a training record's JSON object may have that bgekit reads (the rest are carried along)
SCHEMA_FIELDS = ("query", "pos", "neg", "pos_scores", "neg_scores", "prompt", "type")


def _strings(value: object, name: str, path: Path, line: int, allow_empty: bool) -> list[str]:
    if not isinstance(value, list):
        raise DataFormatError(path, line, f"{name!r} must be a list of strings, got {type(value).__name__}")
    if not value and not allow_empty:
        raise DataFormatError(path, line, f"{name!r} is empty; give at least one passage")
    bad = [i for i, v in enumerate(value) if not isinstance(v, str)]
    if bad:
        raise DataFormatError(path, line, f"{name!r}[{bad[0]}] is {type(value[bad[0]]).__name__}, not a string")
    return value


def _scores(obj: dict, name: str, passages: list[str], path: Path, line: int) -> list[float] | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise DataFormatError(path, line, f"{name!r} must be a list of finite numbers")
    if len(value) != len(passages):
        kind = name.split("_")[0]
        raise DataFormatError(path, line, f"{name!r} has {len(value)} scores but {kind!r} has {len(passages)} passages")
    return [float(v) for v in value]


def parse_record(obj: dict, path: Path, line: int) -> TrainRecord:
    """Validate one JSON object as a training record."""
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        raise DataFormatError(path, line, "'query' must be a non-empty string")
    if "pos" not in obj:
        raise DataFormatError(path, line, "missing 'pos' (the list of relevant passages)")
    pos = _strings(obj["pos"], "pos", path, line, allow_empty=False)
    neg = _strings(obj.get("neg", []), "neg", path, line, allow_empty=True)
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise DataFormatError(path, line, "'prompt' must be a string")
    kind = obj.get("type")
    if kind is not None and not isinstance(kind, str):
        raise DataFormatError(path, line, "'type' must be a string")
    pos_scores, neg_scores = _scores(obj, "pos_scores", pos, path, line), _scores(obj, "neg_scores", neg, path, line)
    if pos_scores is None and neg_scores is not None:
        raise DataFormatError(path, line, "'neg_scores' without 'pos_scores': teacher scores come for both or neither")
    if pos_scores is not None and neg_scores is None:
        if neg:
            raise DataFormatError(
                path, line, "'pos_scores' without 'neg_scores': teacher scores come for both or neither"
            )
        neg_scores = []
    return TrainRecord(
        query,
        pos,
        neg,
        pos_scores,
        neg_scores,
        prompt,
        kind,
        source=f"{path}:{line}",
        raw=obj,
    )


def read_json_array(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line, object)`` of a ``.json`` file holding one JSON array of records, which FlagEmbedding's
    training reads too (``datasets``' json loader); each record's line is where it starts."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataFormatError(path, line, f"not UTF-8 text (byte {raw[exc.start]:#04x})") from None
    decoder = json.JSONDecoder()
    at = text.index("[") + 1

    def line_of(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    def skip(offset: int) -> int:
        while offset < len(text) and text[offset].isspace():
            offset += 1
        return offset

    at = skip(at)
    if at < len(text) and text[at] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, line_of(exc.pos), f"not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, line_of(at), f"expected a JSON object, got {type(obj).__name__}")
        yield line_of(at), obj
        at = skip(end)
        if at < len(text) and text[at] == "]":
            if skip(at + 1) != len(text):
                raise DataFormatError(path, line_of(skip(at + 1)), "text after the end of the JSON array")
            return
        if at >= len(text) or text[at] != ",":
            raise DataFormatError(path, line_of(at), "not valid JSON (expected ',' or ']' between records)")
        at = skip(at + 1)


def _records_of(path: Path) -> Iterator[tuple[int, dict]]:
    """A file's records: JSON Lines, or one JSON array in a ``.json`` file."""
    if path.suffix == ".json" and path.is_file() and _is_json_array(path):
        return read_json_array(path)
    return read_jsonl(path)


def _is_json_array(path: Path) -> bool:
    """Whether a ``.json`` file holds one JSON array (else it is read as JSON Lines)."""
    with path.open("rb") as handle:
        head = handle.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return head.startswith("[")


def training_files(paths: str | Path | Sequence[str | Path]) -> list[tuple[Path, Path | None]]:
    """Each training file with the folder it was found in (None for a file named itself): a folder
    gives its ``.jsonl`` / ``.json`` / ``.jsonl.gz`` files, sorted."""
    files: list[tuple[Path, Path | None]] = []
    for item in [paths] if isinstance(paths, (str, Path)) else paths:
        item = Path(item)
        if item.is_dir():
            files += [
                (p, item)
                for p in sorted(item.iterdir())
                if p.suffix in (".jsonl", ".json") or p.name.endswith(".jsonl.gz")
            ]
        else:
            files.append((item, None))
    if not files:
        raise InputError(f"no training files found in {paths}")
    return files


def load_train_data(paths: str | Path | Sequence[str | Path], *, read_scores: bool = True) -> list[TrainRecord]:
    """Read and validate every record of one or more JSONL files (or folders of them); a ``.json``
    file may also hold one JSON array of records, as FlagEmbedding reads it. Training needs teacher
    scores on every record or none; ``bgekit score`` and ``mine``, which replace or drop them, pass
    ``read_scores=False``: old scores are neither read nor checked (stale ones, of negatives since
    edited, are why a file is scored again), and stay in the record's ``raw`` object."""
    return [r for _, _, file_records in load_train_files(paths, read_scores=read_scores) for r in file_records]


def load_train_files(
    paths: str | Path | Sequence[str | Path],
    *,
    read_scores: bool = True,
    max_per_file: int | None = None,
    seed: int = 42,
) -> list[tuple[Path, Path | None, list[TrainRecord]]]:
    """:func:`load_train_data` file by file: ``(file, folder it was found in or None, its records)``.

    ``max_per_file`` (FlagEmbedding's ``max_example_num_per_dataset``): a file with more records keeps
    that many, drawn by :func:`sample_positions`, and only those are parsed and checked; see
    :func:`sampled_records` for what that means for the lines left out."""
    check_max_per_file(max_per_file)
    loaded = []
    for path, folder in training_files(paths):
        if max_per_file is None:
            records = [_parse(obj, path, line, read_scores) for line, obj in _records_of(path)]
        else:
            records = sampled_records(path, max_per_file, seed, read_scores)
        if not records:
            raise InputError(f"training file {path} holds no records")
        loaded.append((path, folder, records))
    scored = {r.pos_scores is not None for _, _, records in loaded for r in records}
    if read_scores and len(scored) > 1:
        raise InputError("some records have teacher scores and some do not; score every record or none")
    return loaded


def _parse(obj: dict, path: Path, line: int, read_scores: bool) -> TrainRecord:
    if read_scores or not isinstance(obj, dict):
        return parse_record(obj, path, line)
    record = parse_record({k: v for k, v in obj.items() if k not in ("pos_scores", "neg_scores")}, path, line)
    record.raw = obj  # the old scores keep their place for the new ones
    return record


def write_records(path: str | Path, records: Iterable[TrainRecord]) -> None:
    """Write records back as JSONL (atomically), leaving out empty optional fields. A record read from
    a file keeps every field it had there, in its place (``id``, metadata); only the fields bgekit
    changed differ, and a field set to None (stale teacher scores after mining) is dropped."""
    from ..io import write_jsonl

    write_jsonl(path, record_rows(records))


def record_rows(records: Iterable[TrainRecord]) -> Iterator[dict[str, Any]]:
    """The JSON objects :func:`write_records` writes, one a record."""
    for r in records:
        ours = {key: getattr(r, key) for key in SCHEMA_FIELDS}
        row = {key: ours.get(key, value) for key, value in (r.raw or {}).items()}
        row.update(ours)  # new fields go last; fields already there keep their place
        yield {key: value for key, value in row.items() if value is not None or key not in ours}


def check_max_per_file(limit: int | None) -> None:
    """``max_example_num_per_dataset`` is None or a positive number of records."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"max_example_num_per_dataset must be a positive number of records, got {limit!r}")


def sample_positions(count: int, limit: int, seed: int, path: Path) -> list[int] | None:
    """The positions (0-based, in file order) of the ``limit`` records a file of ``count`` records trains
    on, or None when it has no more than ``limit`` (all of them).

    The draw depends on ``seed`` and the file's name alone: adding, removing or renaming another file of
    the folder leaves this file's records as they were, and a resumed run keeps the same ones.
    FlagEmbedding 1.4.2 (``AbsEmbedderTrainDataset._load_dataset``) draws each file's
    ``random.sample`` from Python's one global generator, seeded once before the files are read in
    ``os.listdir`` order: a file's records there change with every file read before it (and that order
    is the file system's). Two files of the same name and size (in two folders) draw the same positions;
    their records differ. FlagEmbedding also trains on the records in the drawn order; here they stay in
    file order (the batches are shuffled anyway)."""
    if count <= limit:
        return None
    return sorted(random.Random(f"{seed}:{path.name}").sample(range(count), limit))


def sampled_records(path: Path, limit: int, seed: int, read_scores: bool = True) -> list[TrainRecord]:
    """A file's records under ``max_example_num_per_dataset``: the sample is drawn first, and only its
    records are parsed and checked, so a large file with a small cap costs about a line count (not the
    whole file's validation). A kept record's error names its file and line, as without the cap.

    A JSON Lines file is read as raw lines: a line is a record when it is not blank, whatever it holds.
    A malformed line (not JSON, not UTF-8, not a record) that is not drawn is not read, so it is neither
    trained on nor reported; one that is drawn is an error (it is not replaced by another record: the
    sample stays a function of the seed and the file). Check a whole file by loading it without the cap
    (``bgekit.train.data.load_train_data``). A ``.json`` array is parsed whole to find its records (its
    JSON must be valid throughout); only the drawn records are then checked."""
    if path.suffix == ".json" and path.is_file() and _is_json_array(path):
        entries = list(read_json_array(path))
        return [_parse(obj, path, line, read_scores) for line, obj in _sample(entries, limit, seed, path)]
    if not path.exists():
        raise InputError(f"input file {path} does not exist")
    lines = [(number, raw) for number, raw in numbered_raw_lines(path) if _not_blank(raw, number)]
    lines = _sample(lines, limit, seed, path)
    return [
        _parse(parse_json_line(path, number, line_text(path, number, raw)), path, number, read_scores)
        for number, raw in lines
    ]


def _sample(items: list, limit: int, seed: int, path: Path) -> list:
    chosen = sample_positions(len(items), limit, seed, path)
    if chosen is None:
        return items
    logger.info("%s: training on %d of its %d records (max_example_num_per_dataset)", path, limit, len(items))
    return [items[i] for i in chosen]


def _not_blank(raw: bytes, number: int) -> bool:
    """Whether a raw line holds a record, as :func:`bgekit.io.read_jsonl` decides (it skips blank lines)."""
    text = raw.decode("utf-8", errors="replace")
    return bool((text.removeprefix("\ufeff") if number == 1 else text).strip())


def keep_per_file(
    files: list[tuple[Path, Path | None, list[TrainRecord]]], limit: int | None, seed: int
) -> list[tuple[Path, Path | None, list[TrainRecord]]]:
    """FlagEmbedding's ``max_example_num_per_dataset`` over files already read: a file with more than
    ``limit`` records keeps ``limit`` of them drawn at random (:func:`sample_positions`: the seed and the
    file's name decide), in file order. Training draws the same records before it reads them
    (``load_train_files(..., max_per_file=limit)``); this is for records already in memory."""
    check_max_per_file(limit)
    if limit is None:
        return files
    kept = []
    for path, folder, records in files:
        chosen = sample_positions(len(records), limit, seed, path)
        kept.append((path, folder, records if chosen is None else [records[i] for i in chosen]))
    return kept


#: FlagEmbedding 1.4.2 leaves passages of up to this many characters as they are under shuffle_ratio
SHUFFLE_MIN_CHARS = 100


def shuffle_text(text: str, rng: random.Random) -> str:
    """``text`` cut in three pieces of about a third of its characters, put back in a random order:
    FlagEmbedding's ``shuffle_ratio`` augmentation of positives, except that the cuts fall between
    words (FlagEmbedding cuts at exact thirds of the characters, splitting words in two and joining
    the halves with a space). A text of fewer than three words (Chinese, Japanese) is cut between
    characters and put back without spaces."""
    starts = [m.start() for m in re.finditer(r"\S+", text)]
    if len(starts) < 3:
        size = len(text) // 3 + 1
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        rng.shuffle(pieces)
        return "".join(pieces)
    # cut before the first word starting past a third (two thirds) of the text, leaving 3 non-empty pieces
    first = min(max(bisect.bisect_left(starts, len(text) / 3), 1), len(starts) - 2)
    second = min(max(bisect.bisect_left(starts, 2 * len(text) / 3), first + 1), len(starts) - 1)
    cuts = [0, starts[first], starts[second], len(text)]
    pieces = [text[a:b].strip() for a, b in itertools.pairwise(cuts)]
    rng.shuffle(pieces)
    return " ".join(pieces)


@dataclass
class Group:
    """What one record contributes to a batch: a query, 1 positive + negatives, teacher scores."""

    query: str
    passages: list[str]
    scores: list[float] | None
    prompt: str | None
    #: the record's ``type``: ``symmetric_sts`` / ``symmetric_clustering`` passages are encoded as queries
    type: str | None = field(default=None, kw_only=True)


class GroupSampler:
    """Draws ``1 positive + (group_size - 1) negatives`` per record, like FlagEmbedding.

    Negatives are drawn without replacement; when there are too few, from the list repeated
    (FlagEmbedding's way: each one appears about equally often), and from other records' passages
    when a record has none. Those random passages get a teacher score of ``-inf``: the teacher's
    distribution gives them no weight, the student learns to score them low. With ``shuffle_ratio``
    a positive of over 100 characters is, with that probability, :func:`shuffle_text`-ed
    (FlagEmbedding's augmentation). Every draw depends on the seed, epoch and record alone.
    """

    def __init__(
        self,
        records: list[TrainRecord],
        group_size: int,
        seed: int = 42,
        corpus: Sequence[str] | None = None,
        *,
        shuffle_ratio: float = 0.0,
    ):
        if group_size < 1:
            raise InputError(f"train_group_size must be >= 1, got {group_size}")
        if not 0.0 <= shuffle_ratio <= 1.0:  # NaN too
            raise InputError(f"shuffle_ratio must be between 0 and 1, got {shuffle_ratio}")
        self.records = records
        self.group_size = group_size
        self.seed = seed
        self.shuffle_ratio = shuffle_ratio
        self._pool = list(corpus) if corpus else [p for r in records for p in r.pos + r.neg]

    @classmethod
    def from_options(cls, records: list[TrainRecord], options) -> GroupSampler:
        """The sampler a trainer's options ask for: their group size, seed and shuffle ratio."""
        return cls(records, options.train_group_size, options.seed, shuffle_ratio=options.shuffle_ratio)

    def __len__(self) -> int:
        return len(self.records)

    def group(self, index: int, epoch: int = 0, group_size: int | None = None) -> Group:
        """Record ``index``'s group for ``epoch``: its ``group_size`` passages (default: the sampler's)."""
        record = self.records[index]
        rng = random.Random(hash((self.seed, epoch, index)))
        p = rng.randrange(len(record.pos))
        passages, scores = [record.pos[p]], [record.pos_scores[p]] if record.pos_scores else None
        if self.shuffle_ratio and len(record.pos[p]) > SHUFFLE_MIN_CHARS:  # its own draws: the rest stay as they were
            shuffler = random.Random(hash((self.seed, epoch, index, 2)))
            if shuffler.random() < self.shuffle_ratio:
                passages[0] = shuffle_text(record.pos[p], shuffler)
        wanted = (self.group_size if group_size is None else group_size) - 1
        if wanted:
            if record.neg:
                # too few: drawn from the list repeated, as FlagEmbedding, so each negative is used evenly
                repeats = math.ceil(wanted / len(record.neg))
                picks = rng.sample(list(range(len(record.neg))) * repeats, wanted)
                passages += [record.neg[i] for i in picks]
                if scores is not None:
                    scores += [record.neg_scores[i] for i in picks]
            else:
                passages += [self._random_negative(rng, set(record.pos)) for _ in range(wanted)]
                if scores is not None:  # the teacher never saw these: it gives them no weight (softmax of -inf)
                    scores += [-math.inf] * wanted
        return Group(record.query, passages, scores, record.prompt, type=record.type)

    def _random_negative(self, rng: random.Random, positives: set[str]) -> str:
        """A random corpus passage that is not one of the record's positives (a few tries)."""
        choice = rng.choice(self._pool)
        for _ in range(16):
            if choice not in positives:
                break
            choice = rng.choice(self._pool)
        return choice


def with_teacher_scores(batch: dict, groups: Sequence[Group]) -> dict:
    """``batch`` plus the groups' teacher scores as a ``(groups, group_size)`` float32 tensor under
    ``teacher_scores`` (nothing added when the records carry none)."""
    if groups[0].scores is not None:
        import torch

        batch["teacher_scores"] = torch.tensor([g.scores for g in groups], dtype=torch.float32)
    return batch
