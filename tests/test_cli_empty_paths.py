"""An empty file or folder option (``-d "$UNSET"``) is a usage error naming the option: ``Path("")`` is the
current folder, so ``bgekit eval retrieval -d ''`` evaluated (and ``index build -o ''`` wrote, and
``finetune --output-dir ''`` trained into) whatever folder the command ran in."""

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
PATH_TEXT_OPTIONS = {"dataset", "deepspeed", "resume_from_checkpoint", "from_peft"}


def _commands(command, names=()):
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*names, name))
    else:
        yield names, command


def path_options() -> list[tuple[tuple[str, ...], str]]:
    """Every (command, option) of the CLI whose value is a file or folder: typed ``Path`` (``Path | None``,
    ``list[Path]``), or one of :data:`PATH_TEXT_OPTIONS`."""
    found = []
    for names, command in _commands(typer.main.get_command(app)):
        signature = inspect.signature(command.callback, eval_str=True)
        for param in command.params:
            if getattr(param, "param_type_name", "") != "option":
                continue
            annotation = signature.parameters[param.name].annotation
            base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
            if "Path" in str(base) or param.name in PATH_TEXT_OPTIONS:
                found.append((names, param.opts[0]))
    return found


PATH_OPTIONS = path_options()


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
