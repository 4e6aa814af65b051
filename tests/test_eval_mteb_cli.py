"""``bgekit eval mteb``: the real mteb package runs real MTEB tasks (SciFact, Banking77Classification) through
its own evaluators. There is no hub here, so each task's data comes from local files: the task's
``load_data`` (its download) is replaced by one that fills in the same data structure from
examples/data, as tests/test_eval_mteb.py gives Banking77Classification its data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .cli import run

mteb = pytest.importorskip("mteb")

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
SCIFACT_PROMPT = "Given a scientific claim, retrieve documents that support or refute the claim"


def _scifact_split() -> dict:
    from datasets import Dataset

    root = DATA / "scifact-mini"
    qrels: dict[str, dict[str, int]] = {}
    for line in (root / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        query, doc, score = line.split("\t")
        qrels.setdefault(query, {})[doc] = int(score)
    corpus = [json.loads(line) for line in (root / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (root / "queries.jsonl").read_text().splitlines()]
    return {
        "corpus": Dataset.from_list([{"id": c["_id"], "title": c.get("title", ""), "text": c["text"]} for c in corpus]),
        "queries": Dataset.from_list([{"id": q["_id"], "text": q["text"]} for q in queries if q["_id"] in qrels]),
        "relevant_docs": qrels,
        "top_ranked": None,
    }


def _banking_dataset() -> dict:
    from datasets import Dataset

    sentences = [line.split("\t")[0] for line in (DATA / "stsb-test-mini.tsv").read_text().splitlines()[1:49]]
    labels = [i % 3 for i in range(len(sentences))]
    train = Dataset.from_dict({"text": sentences[:24], "label": labels[:24]})
    test = Dataset.from_dict({"text": sentences[24:], "label": labels[24:]})
    return {"default": {"train": train, "test": test}}


@pytest.fixture()
def local_tasks(monkeypatch):
    """SciFact and Banking77Classification load the local data instead of downloading theirs."""

    def scifact(self, **kwargs):
        self.dataset = {"default": {"test": _scifact_split()}}
        self.data_loaded = True

    def banking(self, **kwargs):
        self.dataset = _banking_dataset()
        self.data_loaded = True

    monkeypatch.setattr(type(mteb.get_task("SciFact")), "load_data", scifact)
    monkeypatch.setattr(type(mteb.get_task("Banking77Classification")), "load_data", banking)


def direct(model, names, **encoder_options) -> dict[str, dict]:
    """The same tasks run by hand: MtebEncoder + mteb.evaluate, no results folder."""
    from bgekit.eval.mteb import MtebEncoder

    encoder = MtebEncoder(str(model), device="cpu", **encoder_options)
    tasks = mteb.get_tasks(tasks=names)
    # the batch size the command ran with (mteb's encode_kwargs): the tiny model's near-ties follow the padding
    result = mteb.evaluate(encoder, tasks, cache=None, overwrite_strategy="always", encode_kwargs={"batch_size": 8})
    return {r.task_name: r for r in result.task_results}


def test_runs_mteb_tasks_as_mteb_evaluate_does(tmp_path, tiny_bert, local_tasks):
    """Per-task files in mteb's layout, a printed and a JSON summary, each score that of a direct
    MtebEncoder + mteb.evaluate run; FlagEmbedding's underscore spellings work."""
    out = tmp_path / "results"
    result = run(
        "eval", "mteb", "--embedder_name_or_path", str(tiny_bert), "--tasks", "SciFact,Banking77Classification",
        "--output_dir", str(out), "--device", "cpu", "--batch_size", "8",
    )  # fmt: skip
    expected = direct(tiny_bert, ["SciFact", "Banking77Classification"])
    summary = json.loads((out / "summary.json").read_text())
    folder = out / "results" / f"{tiny_bert.parent.name}__{tiny_bert.name}" / "no_revision_available"
    files = sorted(p.name for p in folder.glob("*.json"))
    assert files == ["Banking77Classification.json", "SciFact.json", "model_meta.json"]
    rows = {row["task"]: row for row in summary["tasks"]}
    assert set(rows) == {"SciFact", "Banking77Classification"}
    for name, task_result in expected.items():
        written = json.loads((folder / f"{name}.json").read_text())
        ran = task_result.scores["test"][0]
        numbers = {key: float(value) for key, value in ran.items() if isinstance(value, (int, float))}
        in_file = {key: written["scores"]["test"][0][key] for key in numbers}
        assert numbers and in_file == pytest.approx(numbers, abs=1e-6, nan_ok=True)
        assert rows[name]["score"] == pytest.approx(task_result.get_score(), abs=0)
        assert rows[name]["file"] == str(folder / f"{name}.json")
        assert f"| {name}" in result.stdout and f"{task_result.get_score():.5f}" in result.stdout
    assert rows["SciFact"]["main_score"] == "ndcg_at_10" and rows["SciFact"]["type"] == "Retrieval"
    assert rows["Banking77Classification"]["main_score"] == "accuracy"
    scifact, banking = rows["SciFact"]["score"], rows["Banking77Classification"]["score"]
    assert summary["average"] == pytest.approx((scifact + banking) / 2)
    assert summary["averages"] == {"Retrieval": scifact, "Classification": banking}

    # run again: the results there are kept and reused, not computed afresh (--overwrite runs them again)
    before = (folder / "SciFact.json").read_text()
    again = run("eval", "mteb", "-m", str(tiny_bert), "-t", "SciFact", "-o", str(out), "--device", "cpu")
    assert (folder / "SciFact.json").read_text() == before
    assert f"{rows['SciFact']['score']:.5f}" in again.stdout


def test_special_instructions_are_the_tasks_own(tmp_path, tiny_bert, local_tasks):
    """--use-special-instructions: SciFact's queries get mteb's SciFact instruction (FlagEmbedding's runner gives
    them its prompts.py one, the same text), its documents none; the score is that of MtebEncoder given it."""
    out = tmp_path / "results"
    run(
        "eval", "mteb", "-m", str(tiny_bert), "--tasks", "SciFact", "-o", str(out), "--device", "cpu",
        "--batch-size", "8", "--use_special_instructions",
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["model_prompts"] == {"SciFact-query": SCIFACT_PROMPT}
    prompted = direct(tiny_bert, ["SciFact"], model_prompts={"SciFact-query": SCIFACT_PROMPT})["SciFact"]
    plain = direct(tiny_bert, ["SciFact"])["SciFact"]
    assert summary["tasks"][0]["score"] == prompted.get_score()
    assert prompted.get_score() != plain.get_score()  # the instruction reached the queries

    # a prompts file wins over the task's own; --overwrite runs the task again with it
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"SciFact-query": "", "STS": "Retrieve semantically similar text."}))
    run(
        "eval", "mteb", "-m", str(tiny_bert), "--tasks", "SciFact", "-o", str(out), "--device", "cpu",
        "--batch-size", "8", "--use-special-instructions", "--model-prompts", str(prompts), "--overwrite",
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["model_prompts"] == {"SciFact-query": "", "STS": "Retrieve semantically similar text."}
    unprompted = direct(tiny_bert, ["SciFact"], query_instruction_for_retrieval="")["SciFact"]
    assert summary["tasks"][0]["score"] == unprompted.get_score() != prompted.get_score()


def test_task_examples_reach_an_in_context_learning_model(tmp_path, golden_dir, local_tasks):
    """--examples-path (FlagEmbedding's folder of TASK.json): SciFact's queries get its examples, as
    MtebEncoder(task_examples=...) gives them."""
    icl = golden_dir / "models" / "mistral-icl"
    examples = tmp_path / "examples"
    examples.mkdir()
    given = [{"instruct": SCIFACT_PROMPT, "query": "Pandas eat meat.", "response": "Giant pandas eat bamboo."}]
    (examples / "SciFact.json").write_text(json.dumps(given))
    out = tmp_path / "results"
    run(
        "eval", "mteb", "-m", str(icl), "-t", "SciFact", "--examples_path", str(examples), "-o", str(out),
        "--device", "cpu", "--batch-size", "8",
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["task_examples"] == ["SciFact"]
    options = {"model_class": "decoder-only-icl", "use_fp16": False}
    with_examples = direct(icl, ["SciFact"], task_examples={"SciFact": given}, **options)["SciFact"]
    assert summary["tasks"][0]["score"] == with_examples.get_score()
    assert with_examples.get_score() != direct(icl, ["SciFact"], **options)["SciFact"].get_score()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "SciFactt"], "unknown MTEB task 'SciFactt' (did you mean SciFact"),
        (["--task-types", "Retreival"], "unknown MTEB task type 'Retreival' (did you mean Retrieval"),
        ([], "no tasks chosen: name them with --tasks"),
        (["--tasks", "SciFact", "--task-types", "STS"], "no MTEB task matches tasks SciFact, task types STS"),
        (["--languages", "xyz"], "--languages: Invalid language code: xyz"),
        (["--tasks", "CUB200I2IRetrieval"], "bgekit embeds text; CUB200I2IRetrieval needs other modalities"),
        (["--tasks", "SciFact", "--use-special-examples"], "FlagEmbedding's bundled examples are not shipped"),
    ],
)
def test_bad_task_choices_are_one_line_before_the_model_loads(tmp_path, args, message):
    out = tmp_path / "results"
    result = run("eval", "mteb", "-m", str(tmp_path / "no-model"), "-o", str(out), *args, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_examples_need_an_in_context_learning_model(tmp_path, tiny_bert):
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "SciFact.json").write_text(json.dumps([{"instruct": "i", "query": "q", "response": "r"}]))
    out = tmp_path / "results"
    result = run(
        "eval", "mteb", "-m", str(tiny_bert), "-t", "SciFact", "--examples_path", str(examples), "-o", str(out),
        check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "--examples-path needs an in-context-learning model" in result.stderr
    assert not out.exists()


def test_a_task_whose_data_cannot_load_is_named_and_the_results_before_it_kept(tmp_path, tiny_bert, local_tasks):
    """STS12 has no local data and there is no hub (HF_HUB_OFFLINE=1): datasets' ConnectionError was a
    traceback; it is one line naming the task, and SciFact's results, run before it, stay."""
    out = tmp_path / "results"
    result = run(
        "eval", "mteb", "-m", str(tiny_bert), "-t", "SciFact,STS12", "-o", str(out), "--device", "cpu", check=False
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: MTEB task STS12: its data could not be loaded" in result.stderr
    assert f"the results of SciFact are in {out}" in result.stderr and "Traceback" not in result.stderr
    assert list(out.glob("results/*/*/SciFact.json")) and not (out / "summary.json").exists()
