"""An empty file or folder option (``-d "$UNSET"``) is a usage error naming the option: ``Path("")`` is the
current folder, so ``bgekit eval retrieval -d ''`` evaluated (and ``index build -o ''`` wrote, and
``finetune --output-dir ''`` trained into) whatever folder the command ran in. So is an empty model
(``-m ''`` ran the default model) and any other text option where ``''`` silently meant something else;
those where ``''`` means "none" (``--query-instruction ''``) say so in their help."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
import typer.main

from bgekit.cli import app

from .cli import run

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "examples" / "data" / "scifact-mini"

#: options typed ``str`` that name a file or folder (or a dataset / 'auto'): read as a path, '' is the cwd too
PATH_TEXT_OPTIONS = {"dataset", "deepspeed", "resume_from_checkpoint", "from_peft", "raw_peft"}
#: options that name a model (hub id or folder)
MODEL_OPTIONS = {"model", "reranker", "models"}
#: text options where '' means "none" on purpose (no instruction, prefix, prompt or suffix), documented in the help
TAKES_EMPTY = {
    "query_instruction",
    "query_instruction_for_retrieval",
    "passage_instruction_for_retrieval",
    "query_instruction_for_rerank",
    "passage_instruction_for_rerank",
    "prompt",
    "icl_suffix_str",
}


def _commands(command, names=()):
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*names, name))
    else:
        yield names, command


def _options():
    """Every (command names, click option, its annotated type) of the CLI."""
    for names, command in _commands(typer.main.get_command(app)):
        signature = inspect.signature(command.callback, eval_str=True)
        for param in command.params:
            if getattr(param, "param_type_name", "") != "option":
                continue
            annotation = signature.parameters[param.name].annotation
            base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
            yield names, param, str(base)


def path_options() -> list[tuple[tuple[str, ...], str]]:
    """Every (command, option) of the CLI whose value is a file or folder: typed ``Path`` (``Path | None``,
    ``list[Path]``), or one of :data:`PATH_TEXT_OPTIONS`."""
    return [
        (names, param.opts[0]) for names, param, base in _options() if "Path" in base or param.name in PATH_TEXT_OPTIONS
    ]


def text_options() -> list[tuple[tuple[str, ...], str, str]]:
    """Every (command, option, param name) of the CLI typed ``str`` (``str | None``, ``list[str]``) that is no
    path option: models and other text."""
    return [
        (names, param.opts[0], param.name)
        for names, param, base in _options()
        if "str" in base and "Path" not in base and param.name not in PATH_TEXT_OPTIONS
    ]


PATH_OPTIONS = path_options()
TEXT_OPTIONS = text_options()
REFUSED = [(names, option, name) for names, option, name in TEXT_OPTIONS if name not in TAKES_EMPTY]


def test_the_walk_finds_the_path_options():
    found = {(" ".join(names), option) for names, option in PATH_OPTIONS}
    expected = {
        ("eval retrieval", "--dataset"),
        ("eval retrieval", "--cache-dir"),
        ("index build", "--out"),
        ("search", "--index"),
        ("mine", "--corpus"),
        ("finetune embedder", "--output-dir"),
        ("finetune embedder", "--train-data"),
        ("finetune embedder", "--resume-from-checkpoint"),
        ("data beir-to-train", "--dataset"),
        ("embed", "--output"),
    }
    assert expected <= found and len(found) >= 40


@pytest.mark.parametrize(("names", "option"), PATH_OPTIONS, ids=[f"{' '.join(n)} {o}" for n, o in PATH_OPTIONS])
def test_an_empty_path_option_is_refused_by_name(names, option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what an empty value read or wrote: nothing may appear here
    result = run(*names, option, "", check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.replace("│", " ").split())  # typer boxes and wraps usage errors
    assert f"Invalid value for '{option}'" in message and "empty: name a file or folder ('.' for the current" in message
    assert not list(tmp_path.iterdir())


def test_eval_in_a_dataset_folder_with_an_empty_dataset_is_refused(tmp_path, monkeypatch):
    """Inside a dataset folder ``-d ''`` used to evaluate that folder; ``-d .`` still does."""
    monkeypatch.chdir(MINI)
    result = run("eval", "retrieval", "-m", "nobody/unknown", "-d", "", check=False)
    assert result.returncode == 2 and "Invalid value for '--dataset'" in result.stderr
    out = tmp_path / "train.jsonl"
    run("data", "beir-to-train", "--dataset", ".", "--split", "test", "-o", str(out))
    assert len(out.read_text().splitlines()) == 40
    refused = run("data", "beir-to-train", "--dataset", "", "--split", "test", "-o", str(out), check=False)
    assert refused.returncode == 2 and "Invalid value for '--dataset'" in refused.stderr


def test_the_walk_finds_the_text_options():
    found = {(" ".join(names), option) for names, option, _ in REFUSED}
    expected = {
        ("embed", "--model"),
        ("eval sts", "--model"),
        ("eval retrieval", "--model"),
        ("eval retrieval", "--reranker"),
        ("index build", "--model"),
        ("search", "--model"),
        ("rerank", "--model"),
        ("mine", "--model"),
        ("score", "--reranker"),
        ("merge", "--models"),
        ("pretrain", "--model"),
        ("finetune embedder", "--model"),
        ("finetune reranker", "--model"),
        ("finetune m3", "--model"),
        ("serve", "--model"),
        ("serve", "--reranker"),
        ("serve", "--examples"),
        ("serve", "--api-key"),
        ("embed", "--text-field"),
    }
    assert expected <= found and len(found) >= 60
    kept = {(" ".join(names), option) for names, option, name in TEXT_OPTIONS if name in TAKES_EMPTY}
    assert {("embed", "--query-instruction"), ("serve", "--query-instruction"), ("score", "--prompt")} <= kept


@pytest.mark.parametrize(("names", "option", "name"), REFUSED, ids=[f"{' '.join(n)} {o}" for n, o, _ in REFUSED])
def test_an_empty_text_option_is_refused_by_name(names, option, name, tmp_path, monkeypatch):
    """``-m ''`` ran the default model (``search``: the index's; ``-r ''``: no reranker), ``--api-key ''``
    served without a key, ``--text-field ''`` read 'text', ``--cutoff-layers ''`` the last layer ..."""
    monkeypatch.chdir(tmp_path)
    result = run(*names, option, "", check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.replace("│", " ").split())
    assert f"Invalid value for '{option}'" in message and "empty" in message
    if name in MODEL_OPTIONS:
        assert "name a model (a hub id or folder)" in message
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("names", "option"),
    [(names, option) for names, option, name in TEXT_OPTIONS if name in TAKES_EMPTY],
    ids=[f"{' '.join(n)} {o}" for n, o, name in TEXT_OPTIONS if name in TAKES_EMPTY],
)
def test_a_text_option_that_takes_empty_says_what_it_means(names, option):
    """Where ``''`` is accepted it means "none", and the option's help says so."""
    command = typer.main.get_command(app)
    for name in names:
        command = command.commands[name]
    (param,) = [p for p in command.params if option in p.opts]
    assert "'' for none" in (param.help or "")


@pytest.mark.parametrize("how", ["NAME=", "BGEKIT_EXAMPLES", "--model-class NAME="])
def test_serve_refuses_an_empty_per_model_value(how, golden_dir, tmp_path, monkeypatch):
    """``serve --examples NAME=`` (or ``BGEKIT_EXAMPLES=''``, or ``--model-class NAME=``) reached the family
    options empty: examples read from the folder the server ran in, the registry's family. One line instead,
    before any model loads."""
    import socket

    monkeypatch.chdir(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    model = str(golden_dir / "models" / "mistral-llm")  # a decoder: examples make it an ICL model
    args = ["serve", "-m", model, "--port", port]
    if how == "BGEKIT_EXAMPLES":
        monkeypatch.setenv("BGEKIT_EXAMPLES", "")
    elif how == "NAME=":
        args += ["--examples", f"{model}="]
    else:
        args += ["--model-class", f"{model}="]
    result = run(*args, check=False)
    flag = "--model-class" if "model-class" in how else "--examples"
    assert result.returncode == 2 and f"error: {flag} is empty" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "loaded" not in result.stderr
