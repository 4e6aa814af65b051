"""``bgekit eval mteb``: run a bgekit embedder on MTEB tasks under the ``mteb`` package (``bgekit[mteb]``).

The counterpart of FlagEmbedding 1.4.2's ``python -m FlagEmbedding.evaluation.mteb``: tasks chosen by name,
type and language (``mteb.get_tasks``), the model wrapped in :class:`~bgekit.eval.mteb.MtebEncoder`, every
task run by ``mteb.evaluate`` with its results in mteb's layout (``OUTPUT/results/MODEL/REVISION/TASK.json``,
as ``mteb run --output-folder OUTPUT`` writes them; a task whose results are there is not run again unless
``overwrite``), and a summary of each task's main score.

Per-task instructions: ``use_special_instructions`` gives each task the instruction mteb's task definition
carries (``TaskMetadata.prompt``: the E5-mistral task instructions FlagEmbedding's ``prompts.py`` also holds)
for its queries, or for every text of a task without queries and documents (STS, classification,
clustering), as FlagEmbedding's runner does with ``set_instruction``; documents keep none. ``model_prompts``
(MtebEncoder's keys: ``"SciFact-query"``, ``"STS"``, ...) are added on top and win. ``task_examples`` are an
in-context-learning model's examples per task (FlagEmbedding's ``set_examples``).

Example:
    >>> from bgekit.eval.mteb_run import evaluate_mteb                       # doctest: +SKIP
    >>> run = evaluate_mteb("BAAI/bge-small-en-v1.5", tasks=["SciFact"], output_folder="results")  # doctest: +SKIP
    >>> run.scores()                                                          # doctest: +SKIP
    {'SciFact': 0.7...}
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

#: task types whose calls say which texts are queries and which documents: their instruction is for queries
ASYMMETRIC_TYPES = frozenset({"Retrieval", "Reranking", "InstructionRetrieval", "InstructionReranking"})


def require_mteb():
    """The ``mteb`` module (2.x), or an :class:`InputError` naming the ``mteb`` extra, before any model loads."""
    try:
        import mteb
    except ImportError:
        raise InputError("MTEB evaluation needs the mteb package: pip install 'bgekit[mteb]'") from None
    if not hasattr(mteb, "evaluate"):  # mteb 1.x: MtebEncoder runs under it, this runner does not
        version = getattr(mteb, "__version__", "1.x")
        raise InputError(f"bgekit eval mteb runs on mteb 2 (found mteb {version}): pip install 'bgekit[mteb]'")
    return mteb


def _split(values: Iterable[str] | None) -> list[str]:
    """Repeated and comma-separated values as one list (``--tasks A,B --tasks C``), blanks dropped."""
    return [part.strip() for value in values or () for part in str(value).split(",") if part.strip()]


def select_tasks(
    tasks: Sequence[str] | None = None,
    task_types: Sequence[str] | None = None,
    languages: Sequence[str] | None = None,
) -> list[Any]:
    """mteb's text tasks by name, type and language (ISO 639-3 codes such as ``eng``), as ``mteb.get_tasks``
    selects them; with names and types both, the named tasks of those types. Unknown names and types, and a
    selection that holds no task, are :class:`InputError` s."""
    mteb = require_mteb()
    names, types, langs = _split(tasks), _split(task_types), _split(languages)
    if not (names or types or langs):
        raise InputError("no tasks chosen: name them with --tasks (e.g. SciFact), or pick --task-types / --languages")
    known_names = _task_names()
    unknown = [name for name in names if known_names is not None and name not in known_names]
    if unknown:  # every one at once, with mteb's close matches
        raise InputError("; ".join(_unknown("task", name, known_names or ()) for name in unknown))
    known_types = _task_types()
    bad_types = [t for t in types if known_types is not None and t not in known_types]
    if bad_types:
        raise InputError("; ".join(_unknown("task type", t, known_types or ()) for t in bad_types))
    try:
        if names:
            selected = list(mteb.get_tasks(tasks=names, languages=langs or None))
            if types:
                selected = [task for task in selected if task.metadata.type in types]
        else:
            selected = list(
                mteb.get_tasks(
                    task_types=types or None,
                    languages=langs or None,
                    modalities=["text"],
                    exclusive_modality_filter=True,
                )
            )
    except KeyError as exc:  # an unknown name, where mteb's registry was not readable above
        raise InputError(str(exc.args[0] if exc.args else exc)) from None
    except ValueError as exc:  # an unknown language code
        raise InputError(f"--languages: {exc}") from None
    not_text = [task.metadata.name for task in selected if set(task.metadata.modalities) != {"text"}]
    if not_text:
        raise InputError(f"bgekit embeds text; {', '.join(not_text)} needs other modalities")
    if not selected:
        chosen = ", ".join(
            f"{label} {' '.join(values)}"
            for label, values in (("tasks", names), ("task types", types), ("languages", langs))
            if values
        )
        raise InputError(f"no MTEB task matches {chosen}")
    return selected


def _unknown(what: str, name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown MTEB {what} {name!r}{hint}"


def _task_names() -> Collection[str] | None:
    """The names mteb's registry knows (its private table: None where a release moved it; mteb's own
    KeyError then names an unknown task)."""
    try:
        from mteb.get_tasks import _TASKS_REGISTRY
    except ImportError:
        return None
    return _TASKS_REGISTRY


def _task_types() -> list[str] | None:
    """mteb's task types (``TaskType``'s values), or None where this mteb does not list them."""
    import typing

    try:
        from mteb.abstasks.task_metadata import TaskType
    except ImportError:
        return None
    return list(typing.get_args(TaskType)) or None


def task_instructions(tasks: Iterable[Any]) -> dict[str, str]:
    """``model_prompts`` from the tasks' own instructions (``TaskMetadata.prompt``, a string or a dict with a
    ``"query"`` entry): ``"{task}-query"`` for retrieval and reranking tasks (their documents keep none),
    ``"{task}"`` for the others, whose texts have no prompt type. Tasks without one are left out."""
    prompts: dict[str, str] = {}
    for task in tasks:
        metadata = task.metadata
        prompt = metadata.prompt
        if isinstance(prompt, Mapping):
            prompt = prompt.get("query")
        if not prompt:
            continue
        key = f"{metadata.name}-query" if metadata.type in ASYMMETRIC_TYPES else metadata.name
        prompts[key] = str(prompt)
    return prompts


def read_model_prompts(path: str | Path) -> dict[str, str]:
    """A JSON object file: MtebEncoder prompt names (``"SciFact-query"``, ``"STS"``, ``"query"``) to instructions."""
    data = _read_json(path, "model prompts")
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise InputError(
            f"{path}: model prompts must be one JSON object of prompt names (a task name or type, '-query' / "
            "'-document' added or not) to instruction strings"
        )
    return data


def read_task_examples(path: str | Path, tasks: Iterable[Any] = ()) -> dict[str, list[dict[str, Any]]]:
    """Per-task in-context examples: a folder of ``TASK.json`` files (each a JSON array or JSONL of
    ``{"instruct", "query", "response"}``; FlagEmbedding's ``examples_path`` layout; the selected tasks' files
    are read, a task without one keeps the model's examples), or one JSON object file of prompt names to lists."""
    from .. import io

    path = Path(path)
    if path.is_dir():
        found = {}
        for task in tasks:
            name = task.metadata.name
            if (path / f"{name}.json").is_file():
                found[name] = io.read_examples(path / f"{name}.json")
        if not found:
            names = ", ".join(task.metadata.name for task in tasks)
            raise InputError(f"{path} holds no examples file of the selected tasks (TASK.json: {names})")
        return found
    data = _read_json(path, "task examples")
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise InputError(f"{path}: task examples must be a folder of TASK.json files or one JSON object of lists")
    return data


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


@dataclass
class TaskScore:
    """One task's main score, as mteb computes it (mean over its evaluation splits and subsets)."""

    task: str
    type: str
    main_score: str
    score: float
    file: str | None = None


@dataclass
class MtebRun:
    """What :func:`evaluate_mteb` ran: each task's main score (fractions, as in mteb's JSON), their mean by
    task type and overall, and where the files are."""

    model: str
    output_folder: str
    tasks: list[TaskScore]
    averages: dict[str, float] = field(default_factory=dict)
    average: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def scores(self) -> dict[str, float]:
        return {t.task: t.score for t in self.tasks}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        rows = [[t.task, t.type, t.main_score, f"{t.score:.5f}"] for t in self.tasks]
        if self.average is not None and len(self.tasks) > 1:
            rows.append(["average", "", "", f"{self.average:.5f}"])
        header = ["task", "type", "main score", "score"]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

        def line(cells: list[str]) -> str:
            return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

        return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]) + "\n"

    def save(self, path: str | Path) -> None:
        from .. import io

        self.files["summary"] = str(path)
        text = json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n"
        io.write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def evaluate_mteb(
    model: Any,
    *,
    tasks: Sequence[str] | None = None,
    task_types: Sequence[str] | None = None,
    languages: Sequence[str] | None = None,
    output_folder: str | Path = "results",
    summary: str | Path | None = None,
    overwrite: bool = False,
    use_special_instructions: bool = False,
    model_prompts: Mapping[str, str] | None = None,
    task_examples: Mapping[str, list[dict[str, Any]]] | None = None,
    batch_size: int | None = None,
    symmetric: str = "auto",
    normalize_for_classification: bool | None = None,
    model_options: Mapping[str, Any] | None = None,
    show_progress_bar: bool = False,
    selected: Sequence[Any] | None = None,
) -> MtebRun:
    """Run ``model`` (an Embedder, or a hub id / folder loaded with ``model_options``) on the chosen MTEB tasks.

    Results go to ``output_folder`` in mteb's layout; ``summary`` (default ``OUTPUT/summary.json``) gets the
    :class:`MtebRun` as JSON. ``selected`` takes tasks already chosen with :func:`select_tasks` (the command
    line chooses them before the model loads); otherwise ``tasks`` / ``task_types`` / ``languages`` choose.
    """
    mteb = require_mteb()
    from .mteb import MtebEncoder

    started = time.perf_counter()
    chosen = list(selected) if selected is not None else select_tasks(tasks, task_types, languages)
    output_folder = Path(output_folder)
    summary_path = Path(summary) if summary is not None else output_folder / "summary.json"
    prompts = {**(task_instructions(chosen) if use_special_instructions else {}), **(model_prompts or {})}
    encoder = MtebEncoder(
        model,
        batch_size=batch_size,
        symmetric=symmetric,
        model_prompts=prompts or None,
        task_examples=task_examples or None,
        normalize_for_classification=normalize_for_classification,
        **({} if not isinstance(model, (str, Path)) else dict(model_options or {})),
    )
    loaded = time.perf_counter()
    cache = mteb.ResultCache(output_folder)
    encode_kwargs = {"batch_size": batch_size or encoder.model.batch_size, "show_progress_bar": show_progress_bar}
    task_results = []
    for task in chosen:  # one at a time: a task whose data cannot be loaded is named, those before it kept
        try:
            result = mteb.evaluate(
                encoder,
                [task],
                cache=cache,
                overwrite_strategy="always" if overwrite else "only-missing",
                encode_kwargs=encode_kwargs,
                show_progress_bar=show_progress_bar,
            )
        except ConnectionError as exc:  # datasets' download error (HF_HUB_OFFLINE=1 among others)
            kept = f"; the results of {', '.join(r.task_name for r in task_results)} are in {output_folder}"
            raise InputError(
                f"MTEB task {task.metadata.name}: its data could not be loaded ({exc}){kept if task_results else ''}"
            ) from None
        task_results.extend(result.task_results)
    meta = encoder.mteb_model_meta
    by_name = {task.metadata.name: task for task in chosen}
    scores = []
    for task_result in task_results:
        task = by_name.get(task_result.task_name)
        metadata = task.metadata if task is not None else None
        path = cache.get_task_result_path(task_result.task_name, meta)
        scores.append(
            TaskScore(
                task=task_result.task_name,
                type=metadata.type if metadata else task_result.task_type,
                main_score=metadata.main_score if metadata else "main_score",
                score=float(task_result.get_score()),
                file=str(path) if path.exists() else None,
            )
        )
    averages: dict[str, list[float]] = {}
    for score in scores:
        averages.setdefault(score.type, []).append(score.score)
    run = MtebRun(
        model=encoder.model_name,
        output_folder=str(output_folder),
        tasks=scores,
        averages={kind: sum(values) / len(values) for kind, values in averages.items()},
        average=sum(s.score for s in scores) / len(scores) if scores else None,
        settings={
            "mteb_version": getattr(mteb, "__version__", None),
            "model_prompts": prompts,
            "task_examples": sorted(task_examples or {}),
            "symmetric": symmetric,
            "normalize_for_classification": normalize_for_classification,
            "batch_size": encode_kwargs["batch_size"],
            "overwrite": overwrite,
        },
        timings={
            "load_model_s": round(loaded - started, 3),
            "evaluate_s": round(time.perf_counter() - loaded, 3),
        },
        files={"results": str(cache.cache_path / "results" / meta.model_name_as_path())},
    )
    run.save(summary_path)
    return run
