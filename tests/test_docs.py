"""The docs say what the code does. For README.md and docs/*.md:

- every ``bgekit ...`` command (fenced shell blocks and inline code) names a real command, real options
  with their values, no extra argument and enum values among the choices: parsed by the real typer app's
  own click parser, as the shell would hand it the words (continuations, comments, pipes, ``[optional]``
  parts, ``...`` and placeholders handled);
- every bgekit name their Python uses exists (imports, attributes, attributes of instances made from bgekit
  classes), and keyword arguments are in the signatures; the same for Python calls in inline code and for
  API bullet lists (``- `bgekit.eval.metrics`: `evaluate_run(qrels, ...)` ``);
- options named in prose exist on some command; files, make targets, extras and benchmark-script options
  the docs name exist;
- docs/serving.md's routes, request-field tables, options table (flags, environment variables, defaults) and
  error codes are the server's.

Nothing runs and no model loads."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import pytest
import typer.main

from bgekit.cli import app

from .conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"", "sh", "bash", "shell", "console", "zsh"}
PYTHON = {"python", "py"}
CLI = typer.main.get_command(app)


@dataclass
class Snippet:
    doc: Path
    line: int  # 1-based, in doc
    lang: str
    text: str
    inline: bool = False

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def fenced_blocks(doc: Path) -> Iterator[Snippet]:
    lines = doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"\s*(`{3,})\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence.group(1)):
            body.append(lines[i])
            i += 1
        indent = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
        yield Snippet(doc, start + 2, fence.group(2).lower(), "\n".join(b[indent:] for b in body))
        i += 1


def inline_spans(doc: Path) -> Iterator[Snippet]:
    """Inline code spans outside fenced blocks (prose: `bgekit embed --bf16`, `bgekit.eval.index`), also
    those that wrap onto the next line (read with the line break as a space)."""
    prose, in_fence = [], False
    for line in doc.read_text().splitlines():
        if re.match(r"\s*```", line):
            in_fence = not in_fence
            line = ""
        prose.append("" if in_fence else line)
    text = "\n".join(prose)
    for paragraph in re.finditer(r"(?:[^\n]+\n?)+", text):
        for span in re.finditer(r"`([^`]+)`", paragraph.group()):
            number = text.count("\n", 0, paragraph.start() + span.start()) + 1
            yield Snippet(doc, number, "inline", " ".join(span.group(1).split("\n")), inline=True)


# ---- shell: which bgekit commands a block runs -------------------------------------------------------


def shell_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line offset, logical line): continuations joined, heredoc bodies left out."""
    lines, i = text.splitlines(), 0
    while i < len(lines):
        start, line = i, lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i]
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        i += 1
        if heredoc:
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
            i += 1
        yield start, line


def split_words(line: str) -> list[str]:
    """The shell's words of one line, comments dropped; ``a|b`` between words (a placeholder's
    alternatives, ``--packed auto|on|off``) stays one word, as does ``<placeholder>``."""
    line = re.sub(r"(?<=[\w\-\]])\|(?=[\w\-\[])", "/", line)
    line = re.sub(r"<([\w.\-]+)>", r"\1", line)
    line = re.sub(r"(?<![^\s\[])(\.\.\.|…)(?=[\s\]]|$)", " ", line)  # "and so on"; a quoted "..." is a value
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def bgekit_args(words: list[str]) -> Iterator[list[str]]:
    """The arguments of each ``bgekit`` run on one line (``a && bgekit ... | head`` ...)."""
    segment: list[str] = []
    for word in [*words, ";"]:
        if word and set(word) <= set(";&|"):
            yield from _invocation(segment)
            segment = []
        else:
            segment.append(word)


def _invocation(words: list[str]) -> Iterator[list[str]]:
    cleaned, skip = [], False
    for word in words:  # redirections: `> out.txt`, `2>&1`
        if skip:
            skip = False
        elif set(word) <= set("<>&"):
            if cleaned and cleaned[-1].isdigit():  # the 2 of 2>&1 (or of 2> err.log)
                cleaned.pop()
            skip = True
        else:
            cleaned.append(word)
    words = cleaned
    start = 0
    while start < len(words) and re.fullmatch(r"[A-Za-z_]\w*=.*", words[start]):  # ENV=value bgekit ...
        start += 1
    if start < len(words) and (words[start] == "bgekit" or words[start].endswith("/bgekit")):
        yield _placeholders(words[start + 1 :])
    for i, word in enumerate(words[:-1]):  # python -m bgekit.train ..., torchrun ... -m bgekit.train ...
        if word == "-m" and words[i + 1] in ("bgekit.train", "bgekit.cli"):
            yield _placeholders(words[i + 2 :])


def _placeholders(args: list[str]) -> list[str]:
    """``[--opt X]`` is an optional ``--opt X``."""
    out = []
    for arg in args:
        arg = arg.lstrip("[").rstrip("]") if arg.startswith("[") or arg.endswith("]") else arg
        if arg:
            out.append(arg)
    return out


def shell_commands(snippet: Snippet) -> Iterator[tuple[int, list[str]]]:
    lines = list(shell_lines(snippet.text))
    while lines:
        offset, line = lines.pop(0)
        while True:
            try:
                words = split_words(line)
                break
            except ValueError as exc:  # a quote closes on a later line (curl -d '{...\n...}'), or never
                if not lines:
                    yield offset, ["<unparsable>", f"{exc}: {line.strip()}"]
                    words = []
                    break
                line += "\n" + lines.pop(0)[1]
        for args in bgekit_args(words):
            yield offset, args


# ---- the CLI: does it take these arguments? ------------------------------------------------------------


def _usage_error(exc: Exception) -> str:
    """click's (or typer's own copy of click's) usage error as its message; anything else is a bug here."""
    if not any(cls.__name__ == "UsageError" for cls in type(exc).__mro__):
        raise exc
    return exc.format_message()


def _choices(param) -> list[str] | None:
    """The values an option takes, when it takes a fixed set (an Enum: ``--dtype``, ``--packed``)."""
    choices = getattr(getattr(param, "type", None), "choices", None)  # click
    if choices is not None:
        return [str(getattr(c, "value", c)) for c in choices]
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)  # typer >= 0.26
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [str(member.value) for member in annotation]
    return None


def _parse(command, name: str, args: list[str]) -> tuple[dict, list[str]]:
    """click's own parse of ``args`` for ``command``: the options' raw values and what is left over
    (a group's command and its arguments; a command's extra arguments). Values are not converted, no
    callback runs; an unknown option or one missing its value raises click's usage error."""
    if hasattr(command, "spread"):  # `merge --models A B`: its parse_args spreads them first
        from bgekit.train.cli import spread_values

        args = spread_values(list(args), command.spread)
    ctx = command.context_class(command, info_name=name)
    values, rest, _ = command.make_parser(ctx).parse_args(list(args))
    return values, rest


def check_args(args: list[str]) -> str | None:
    """Why ``bgekit ARGS`` is not a valid command line (None when it is): an unknown command or option,
    an option without its value, an extra argument (a flag given a value), a value outside an option's
    choices. Placeholders such as ``M`` or ``N`` stand in for values; nothing runs."""
    if args[:1] == ["<unparsable>"]:
        return args[1]
    command = CLI
    path = ["bgekit"]
    try:
        while hasattr(command, "commands"):  # a group (typer may bring its own copy of click)
            _, rest = _parse(command, " ".join(path), args)
            if not rest:
                return None if "--help" in args else f"{' '.join(path)}: no command given"
            if rest[0] not in command.commands:
                return f"{' '.join(path)}: no such command {rest[0]!r}"
            command, args = command.commands[rest[0]], rest[1:]
            path.append(rest[0])
        name = " ".join(path)
        values, extra = _parse(command, name, args)
    except Exception as exc:
        return f"{' '.join(path)}: {_usage_error(exc)}"
    if extra:
        return f"{name}: unexpected extra arguments {extra}"
    for param in command.params:
        choices = _choices(param)
        if choices and param.name in values:
            given = values[param.name]
            for value in given if isinstance(given, list) else [given]:
                if isinstance(value, str) and not _placeholder(value) and value not in choices:
                    return f"{name}: {param.opts[0]} {value!r} is not one of {choices}"
    return None


def _placeholder(value: str) -> bool:
    """``M``, ``DIR``, ``auto|on|off`` (read as ``auto/on/off``): no value to check."""
    return value.isupper() or "/" in value


def doc_commands() -> list[tuple[str, list[str]]]:
    """(where, arguments) of every ``bgekit`` command in the docs' shell blocks and inline code. Prose
    may name an option without its value (`bgekit mine --corpus`): there a placeholder value is added."""
    found = []
    for doc in DOCS:
        for snippet in fenced_blocks(doc):
            if snippet.lang in SHELL:
                found += [
                    (f"{snippet.doc.relative_to(ROOT)}:{snippet.line + o}", a) for o, a in shell_commands(snippet)
                ]
        for span in inline_spans(doc):
            if re.match(r"(\w+=\S+ )*bgekit [a-z-]", span.text):
                for _, args in shell_commands(span):
                    if "requires an argument" in (check_args(args) or ""):
                        args = [*args, "X"]
                    found.append((span.where, args))
    return found


COMMANDS = doc_commands()


def test_the_docs_hold_commands_of_every_group():
    """The extraction finds what is there (a parser that found nothing would pass everything)."""
    firsts = {args[0] for _, args in COMMANDS if args}
    assert {"embed", "rerank", "eval", "index", "search", "serve", "finetune", "mine", "merge", "data"} <= firsts
    assert len(COMMANDS) > 80


def test_the_extraction_reads_commands_as_the_shell_does():
    def args(line):
        return list(bgekit_args(split_words(line)))

    assert args("HF_HUB_OFFLINE=1 bgekit eval sts -m M --data F 2>&1 | tee log  # a comment") == [
        ["eval", "sts", "-m", "M", "--data", "F"]
    ]
    assert args("bgekit index build -c C -o I && bgekit search -i I 'a query' > hits.txt") == [
        ["index", "build", "-c", "C", "-o", "I"],
        ["search", "-i", "I", "a query"],
    ]
    assert args("torchrun --nproc_per_node 2 -m bgekit.train finetune embedder [--bf16] ...") == [
        ["finetune", "embedder", "--bf16"]
    ]
    assert args("pip install bgekit") == [] and args("bgekit serve --packed auto|on|off") == [
        ["serve", "--packed", "auto/on/off"]
    ]
    lines = list(shell_lines("bgekit embed \\\n  -i x.txt\npython - <<'PY'\nbgekit embed --nope\nPY\n"))
    assert [line.split() for _, line in lines] == [["bgekit", "embed", "-i", "x.txt"], ["python", "-", "<<'PY'"]]


def test_the_check_refuses_what_the_cli_refuses():
    assert check_args(["embed", "--no-such-option", "x"]) and check_args(["evaluate", "retrieval"])
    assert "unexpected extra arguments ['x']" in check_args(["models", "--json", "x"])  # a flag given a value
    assert "requires an argument" in check_args(["embed", "-i"]) and check_args(["eval"])
    assert "not one of" in check_args(["serve", "--dtype", "float8"])
    assert check_args(["merge", "--models", "A", "B", "--weights", "1", "1", "--output-dir", "O"]) is None
    assert check_args(["eval", "retrieval", "-m", "M", "-d", "DIR", "--split", "test"]) is None


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_command_in_the_docs_runs_on_the_cli(doc):
    name = str(doc.relative_to(ROOT))
    problems = [
        f"{where}: bgekit {' '.join(args)}\n    {why}"
        for where, args in COMMANDS
        if where.startswith(name + ":") and (why := check_args(args))
    ]
    assert not problems, "\n".join(problems)


# ---- Python: do the names and keywords exist? -------------------------------------------------------------


def resolve(dotted: str):
    """The object ``bgekit.a.b.C.d`` names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name and not exc.name.startswith("bgekit"):
                pytest.skip(f"{exc.name} is not installed (needed for {dotted})")
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError: the docs name something that is not there
        return obj
    raise ModuleNotFoundError(dotted)


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def python_problems(snippet: Snippet, known: dict[str, str] | None = None) -> list[str]:
    """What in a Python snippet names no real bgekit object, attribute or keyword; ``known`` binds names
    the snippet does not import (inline code: `MtebEncoder(model, symmetric="query")`)."""
    try:
        tree = ast.parse(snippet.text)
    except SyntaxError as exc:
        return [f"{snippet.doc.relative_to(ROOT)}:{snippet.line + (exc.lineno or 1) - 1}: not Python: {exc.msg}"]
    bound: dict[str, str] = dict(known or {})  # local name -> the bgekit name it stands for
    problems = []

    def where(node):
        return f"{snippet.doc.relative_to(ROOT)}:{snippet.line + node.lineno - 1}"

    def lookup(node, dotted):
        try:
            return resolve(dotted)
        except (AttributeError, ModuleNotFoundError, ImportError) as exc:
            problems.append(f"{where(node)}: {dotted} does not exist ({type(exc).__name__}: {exc})")
            return None

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bgekit":
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "bgekit":
                    # `import bgekit.eval` binds bgekit; `import bgekit.eval as ev` binds ev to bgekit.eval
                    bound[alias.asname or "bgekit"] = alias.name if alias.asname else "bgekit"
    instances = {}  # `m3 = BGEM3FlagModel(...)`, `index = ShardedIndex.build(...)`: local name -> its class
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            made = _dotted(node.value.func) if isinstance(node.value, ast.Call) else None
            head, _, tail = (made or "").partition(".")
            if head in bound and tail in ("", "from_pretrained", "from_finetuned", "build", "load"):
                cls = lookup(node, bound[head])
                if inspect.isclass(cls):
                    instances[node.targets[0].id] = cls
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in instances:
            cls = instances[node.value.id]
            if not _has_attribute(cls, node.attr):
                problems.append(
                    f"{where(node)}: {cls.__name__} has no attribute {node.attr!r} ({node.value.id}.{node.attr})"
                )
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.keywords:
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id in instances:
                method = getattr(instances[owner.id], node.func.attr, None)
                problems += _keyword_problems(node, method, f"{owner.id}.{node.func.attr}", where)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom | ast.Import):
            names = [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for dotted in names:
                if dotted.split(".")[0] == "bgekit":
                    lookup(node, dotted)
        elif isinstance(node, ast.Attribute | ast.Name) and not isinstance(getattr(node, "ctx", None), ast.Store):
            dotted = _dotted(node)
            if dotted and dotted.split(".")[0] in bound and "." in dotted:
                head, _, tail = dotted.partition(".")
                lookup(node, f"{bound[head]}.{tail}")
        if isinstance(node, ast.Call) and node.keywords and (dotted := _dotted(node.func)):
            head, _, tail = dotted.partition(".")
            if head not in bound:
                continue
            target = lookup(node, ".".join(filter(None, [bound[head], tail])))
            problems += _keyword_problems(node, target, dotted, where)
    return problems


def _keyword_problems(call: ast.Call, target, name: str, where) -> list[str]:
    """The keywords of ``call`` that ``target``'s signature has no parameter for (none when it takes
    ``**kwargs`` or has no signature)."""
    if target is None:
        return []
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    names = {p.name for p in params}
    return [
        f"{where(call)}: {name}() takes no keyword {k.arg!r}" for k in call.keywords if k.arg and k.arg not in names
    ]


def _has_attribute(cls: type, attr: str) -> bool:
    """A class attribute or method, or an instance attribute its code sets (``self.attr = ...``)."""
    if hasattr(cls, attr) or attr in getattr(cls, "__annotations__", {}):
        return True
    for klass in cls.__mro__:
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"self\.{attr}\b\s*(?::[^=]*)?=", source):
            return True
    return False


def inline_name_problems(snippet: Snippet) -> list[str]:
    """`bgekit.eval.index`, `bgekit.train.merge.merge_models([...])`, `from bgekit import FlagModel` in prose."""
    problems = []
    imports = re.findall(r"from (bgekit[\w.]*) import ([\w, ]+)", snippet.text)
    names = [f"{module}.{name.strip()}" for module, listed in imports for name in listed.split(",") if name.strip()]
    for dotted in names + re.findall(r"(?<![\w/.])bgekit(?:\.\w+)+", snippet.text):
        if dotted.rsplit(".", 1)[1] in ("json", "py", "md", "toml", "txt"):  # a file: OUT/bgekit.json
            continue
        try:
            resolve(dotted)
        except (AttributeError, ModuleNotFoundError, ImportError) as exc:
            problems.append(f"{snippet.where}: {dotted} does not exist ({type(exc).__name__}: {exc})")
    return problems


def python_heredocs(snippet: Snippet) -> Iterator[Snippet]:
    """The Python of ``python - <<'PY' ... PY`` in a shell block."""
    lines = snippet.text.splitlines()
    for i, line in enumerate(lines):
        heredoc = re.search(r"python\S* - <<-?\s*['\"]?(\w+)['\"]?", line)
        if heredoc:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == heredoc.group(1)), len(lines))
            yield Snippet(snippet.doc, snippet.line + i + 1, "python", "\n".join(lines[i + 1 : end]))


def imported_names() -> dict[str, str]:
    """Every name the docs' Python imports from bgekit, and bgekit's own exports: what a bare
    `FlagModel(...)` or `evaluate_run(...)` in prose stands for."""
    import bgekit

    known = {name: f"bgekit.{name}" for name in bgekit.__all__}
    for doc in DOCS:
        for module, names in re.findall(r"from (bgekit[\w.]*) import ([\w, ]+)", doc.read_text()):
            known.update({n.strip(): f"{module}.{n.strip()}" for n in names.split(",") if n.strip()})
        for module, body in re.findall(r"^- `(bgekit[\w.]*)`: (.*?)(?=^\S|^- |\Z)", doc.read_text(), re.M | re.S):
            known.update({n: f"{module}.{n}" for n in re.findall(r"`([A-Za-z_]\w*)[.(]", body)})
    return known


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_bgekit_call_in_prose_is_real(doc):
    """Inline code that is a Python call (`MtebEncoder(model, symmetric="query")`,
    `ShardedIndex.build(..., quantization="int8")`) uses real attributes and keywords."""
    known = imported_names()
    problems = []
    for span in inline_spans(doc):
        if "(" not in span.text or re.match(r"(\w+=\S+ )*bgekit ", span.text):
            continue
        try:
            ast.parse(span.text)
        except SyntaxError:
            continue
        problems += python_problems(span, known)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_bgekit_name_in_the_docs_exists(doc):
    problems = []
    for snippet in fenced_blocks(doc):
        if snippet.lang in PYTHON:
            problems += python_problems(snippet)
        elif snippet.lang in SHELL:
            for python in python_heredocs(snippet):
                problems += python_problems(python)
    for span in inline_spans(doc):
        problems += inline_name_problems(span)
    assert not problems, "\n".join(problems)


def test_the_python_check_finds_a_missing_name_and_keyword():
    snippet = Snippet(
        DOCS[0],
        1,
        "python",
        "from bgekit import Embedder, NoSuchThing\nfrom bgekit.eval import evaluate_retrieval\n"
        "Embedder.no_such_method()\nevaluate_retrieval('m', 'd', no_such_keyword=1)\n"
        "from bgekit.eval.index import DenseIndex\nindex = DenseIndex.build(x, ids)\nindex.searchh(q, 10)\n"
        "index.search(q, k=10, kk=1)\n",
    )
    problems = "\n".join(python_problems(snippet))
    assert "bgekit.NoSuchThing" in problems and "Embedder.no_such_method" in problems
    assert "no_such_keyword" in problems
    assert "DenseIndex has no attribute 'searchh'" in problems and "index.search() takes no keyword 'kk'" in problems


# ---- files the docs point at ----------------------------------------------------------------------------------


def pointed_files(doc: Path) -> Iterator[tuple[str, str]]:
    """(where, path) of repository files named in code (`tests/test_packed.py`, `bgekit/serve/schemas.py`,
    `python benchmarks/speed.py`) or linked ([RESULTS.md](benchmarks/RESULTS.md#speed))."""
    rel = doc.relative_to(ROOT)
    # a file with its extension (not "docs/s"), or a folder of examples/
    pattern = r"(?<![\w/.$~-])((?:(?:tests|benchmarks|docs|src|bgekit)/[\w./-]*\.\w+|examples/[\w./-]*\w)(?:::\w+)?)"
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for path in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", line):
            yield f"{rel}:{number}", str((doc.parent / path).resolve().relative_to(ROOT))
        for span in re.findall(r"`([^`]+)`", line) if "`" in line else [line]:
            for path in re.findall(pattern, span):
                yield f"{rel}:{number}", path


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_file_the_docs_name_exists(doc):
    problems = []
    for where, path in pointed_files(doc):
        path, _, test = path.partition("::")
        file = ROOT / "src" / path if path.startswith("bgekit/") else ROOT / path
        if not file.exists() and not (path.startswith("bgekit/") and file.with_suffix(".py").exists()):
            problems.append(f"{where}: {path} does not exist")
        elif test and f"def {test}(" not in file.read_text():
            problems.append(f"{where}: {path} has no {test}")
    assert not problems, "\n".join(problems)


def test_every_make_target_in_the_docs_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = {
        (span.where, target)
        for doc in DOCS
        for span in [*fenced_blocks(doc), *inline_spans(doc)]
        for target in re.findall(r"(?:^|\n|`)make ([\w-]+)", span.text if not span.inline else "`" + span.text)
    }
    assert {t for _, t in named} >= {"demo", "test"}
    missing = [f"{where}: make {target}" for where, target in named if target not in targets]
    assert not missing, missing


# ---- docs/serving.md against the server's schemas -----------------------------------------------------------------


def route_tables(doc: Path) -> dict[str, set[str]]:
    """``METHOD /path`` -> the request fields its ``| field | type | |`` table lists."""
    tables: dict[str, set[str]] = {}
    route = None
    in_table = False
    for line in doc.read_text().splitlines():
        heading = re.match(r"#+ `(GET|POST) (\S+)`", line)
        if heading:
            route = f"{heading.group(1)} {heading.group(2)}"
            continue
        if line.startswith("#"):
            route = None
        if re.match(r"\| field \|", line):
            in_table = True
            continue
        if in_table and line.startswith("|"):
            cell = line.split("|")[1]
            if route and not set(cell.strip()) <= set("- "):
                tables.setdefault(route, set()).update(re.findall(r"`(\w+)`", cell))
        else:
            in_table = False
    return tables


def app_routes() -> dict[str, str | None]:
    """``METHOD /path`` -> the name of its request schema (None without a body), read from the route
    functions in bgekit/serve/app.py (building the app needs a loaded model)."""
    tree = ast.parse((ROOT / "src" / "bgekit" / "serve" / "app.py").read_text())
    routes = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.AsyncFunctionDef):
            continue
        for decorator in fn.decorator_list:
            if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)):
                continue
            router, verb = _dotted(decorator.func.value), decorator.func.attr
            if router not in ("router", "cohere") or verb not in ("get", "post", "api_route"):
                continue
            methods = [verb.upper()]
            for keyword in decorator.keywords:
                if keyword.arg == "methods":
                    methods = [m.value for m in keyword.value.elts]
            path = ("/v1" if router == "router" else "/v2") + decorator.args[0].value
            path = re.sub(r"\{(\w+)(:\w+)?\}", "{}", path)
            request = next((a.annotation.id for a in fn.args.args if a.arg == "request"), None)
            for method in methods:
                routes[f"{method} {path}"] = request
    for call in ast.walk(tree):  # router.add_api_route("/health", health, methods=["HEAD"], ...)
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)):
            continue
        if call.func.attr != "add_api_route" or _dotted(call.func.value) not in ("router", "cohere"):
            continue
        path = ("/v1" if _dotted(call.func.value) == "router" else "/v2") + call.args[0].value
        methods = next((k.value.elts for k in call.keywords if k.arg == "methods"), [])
        for method in methods:
            routes[f"{method.value} {path}"] = None
    return routes


def test_serving_docs_routes_and_request_fields_are_the_servers():
    """Each route docs/serving.md names is one the app has (``/health`` being ``/v1/health`` unprefixed),
    each route of the app is documented, and each route's ``| field | type | |`` table lists exactly its
    request schema's fields (bgekit/serve/schemas.py)."""
    from bgekit.serve import schemas

    routes = app_routes()
    assert {"POST /v1/embeddings", "POST /v2/embed", "GET /v1/models/{}", "HEAD /v1/health"} <= set(routes)
    text = (ROOT / "docs" / "serving.md").read_text()
    named = re.findall(r"`(GET|POST|HEAD) (/[\w/{}]+)`", text)
    documented = {method + " " + re.sub(r"[{]\w+[}]", "{}", path) for method, path in named}

    def known(route):
        method, path = route.split()
        return route in routes or f"{method} /v1{path}" in routes

    assert all(known(r) for r in documented), sorted(r for r in documented if not known(r))
    undocumented = {r for r in routes if r not in documented and r.replace(" /v1/", " /", 1) not in documented}
    assert undocumented <= {"HEAD /v1/health", "HEAD /v1/metrics"}, sorted(undocumented)
    assert "`HEAD` works too" in text
    tables = route_tables(ROOT / "docs" / "serving.md")
    requests = {route: name for route, name in routes.items() if name}
    assert set(tables) == set(requests), "a route with a body has no field table, or a table names no route"
    for route, name in requests.items():
        fields = set(getattr(schemas, name).model_fields)
        assert tables[route] == fields, (
            f"{route}: documented but not taken {sorted(tables[route] - fields)}, "
            f"taken but not documented {sorted(fields - tables[route])}"
        )


# ---- options named in prose -----------------------------------------------------------------------------------


def _all_options() -> set[str]:
    def commands(command):
        yield command
        for sub in getattr(command, "commands", {}).values():
            yield from commands(sub)

    return {opt for c in commands(CLI) for p in c.params for opt in (*p.opts, *p.secondary_opts)}


def test_every_option_named_in_prose_exists():
    """An option named in inline code (`--range-for-sampling`, `--fp16/--no-fp16`) is one of some bgekit
    command (or of the benchmark script it is given to). FlagEmbedding's own options are spelled with
    underscores (`--knowledge_distillation True`) and are left alone."""
    options = _all_options()
    scripts = "\n".join(p.read_text() for p in (ROOT / "benchmarks").glob("*.py"))
    problems = []
    for doc in DOCS:
        for span in inline_spans(doc):
            if re.match(r"(python|torchrun|pip|cp|ray) ", span.text) and "bgekit" not in span.text:
                continue
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*[a-z0-9])(?![\w*-])", span.text):  # not --no-...
                if flag not in options and f'"{flag}"' not in scripts:
                    problems.append(f"{span.where}: {flag} is no option of any bgekit command ({span.text!r})")
    assert not problems, "\n".join(problems)


def test_serving_options_table_is_the_serve_command():
    """docs/serving.md's options table lists every `bgekit serve` option once, with its environment
    variable and (where it gives a literal) its default."""
    from bgekit.serve.cli import FAMILY_FLAGS

    serve = CLI.commands["serve"]
    params = {opt: p for p in serve.params for opt in (*p.opts, *p.secondary_opts)}
    text = (ROOT / "docs" / "serving.md").read_text()
    table = text.split("### Options and environment variables", 1)[1].split("\n## ", 1)[0]
    listed, problems, compared = set(), [], []
    for row in re.findall(r"^\| (`-.*)$", table, re.M):
        cells = [c.strip() for c in row.split(" | ")]
        flags = list(dict.fromkeys(re.findall(r"(--?[a-z][\w-]*)", cells[0])))
        listed.update(flags)
        problems += [f"{flag}: no such option of bgekit serve" for flag in flags if flag not in params]
        primaries = [f for f in flags if f.startswith("--") and not f.startswith("--no-")]
        for flag, env in zip(primaries, re.findall(r"`(BGEKIT_\w+)`", cells[1]), strict=False):
            reads = params[flag].envvar or FAMILY_FLAGS.get(flag) if flag in params else env
            if env != reads:
                problems.append(f"{flag}: the table says {env}, the option reads {reads}")
        literal = re.fullmatch(r"`([^`]+)`", cells[2])
        param = params.get(primaries[0]) if primaries else None
        if literal and param is not None and param.default is not None:
            default = f"{param.default:g}" if isinstance(param.default, float) else param.default
            compared.append(primaries[0])
            if str(getattr(default, "value", default)) != literal.group(1):
                problems.append(f"{primaries[0]}: the table says default {literal.group(1)}, the option has {default}")
    unlisted = {p.opts[0] for p in serve.params if not listed & {*p.opts, *p.secondary_opts}} - {"--verbose"}
    problems += [f"{flag}: a bgekit serve option missing from the table" for flag in sorted(unlisted)]
    assert len(compared) >= 10, compared
    assert not problems, "\n".join(problems)


def test_benchmark_commands_take_their_options():
    """`python benchmarks/speed.py --backends ...` in the docs: the script exists and declares each option."""
    problems, seen = [], 0
    for doc in DOCS:
        snippets = [*[b for b in fenced_blocks(doc) if b.lang in SHELL], *inline_spans(doc)]
        for snippet in snippets:
            for _, line in shell_lines(snippet.text):
                for script, args in re.findall(r"(?:python|bash) (benchmarks/[\w.]+)([^#`;|&]*)", line):
                    seen += 1
                    source = (ROOT / script).read_text() if (ROOT / script).exists() else ""
                    for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", args):
                        if f'"{flag}"' not in source:
                            problems.append(f"{snippet.where}: {script} declares no {flag}")
    assert seen >= 5
    assert not problems, "\n".join(problems)


def test_serving_docs_error_codes_are_the_servers():
    """Each `code` in docs/serving.md's errors table is one the server's code gives (a string literal in
    bgekit/serve)."""
    text = (ROOT / "docs" / "serving.md").read_text()
    table = text.split("\n## Errors", 1)[1].split("\n## ", 1)[0]
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "bgekit" / "serve").glob("*.py"))
    codes = [
        (status, code)
        for status, cell in re.findall(r"^\| (\d{3}) \| ([^|]+) \|", table, re.M)
        for code in re.findall(r"`(\w+)`", cell)
    ]
    assert len(codes) >= 15, codes
    missing = [f"{status} {code}" for status, code in codes if f'"{code}"' not in source]
    assert not missing, f"error codes docs/serving.md names that bgekit/serve never gives: {missing}"


def test_every_extra_the_docs_install_exists():
    """`pip install 'bgekit[eval]'` names an extra pyproject.toml declares."""
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {
        e for doc in DOCS for group in re.findall(r"bgekit\[([\w,-]+)\]", doc.read_text()) for e in group.split(",")
    }
    assert {"eval", "serve"} <= named
    assert named <= extras, sorted(named - extras)


def test_api_lists_name_real_functions_and_parameters():
    """A bullet such as ``- `bgekit.eval.metrics`: `evaluate_run(qrels, run, k_values, ignore_identical_ids=False)` ``
    names functions of that module (``.search(...)``: a method of the class named before it) with their own
    parameter names."""
    problems, checked = [], 0
    for doc in DOCS:
        bullets = re.findall(r"^- `(bgekit[\w.]*)`: (.*?)(?=^\S|^- |\Z)", doc.read_text(), re.M | re.S)
        for module, body in bullets:
            owner = None
            for name, args in re.findall(r"`(\.?[A-Za-z_][\w.]*)\(([^`]*)\)`", " ".join(body.split())):
                dotted = f"{owner}{name}" if name.startswith(".") and owner else f"{module}.{name}"
                owner = dotted.rsplit(".", 1)[0] if "." in name.lstrip(".") or name.startswith(".") else owner
                try:
                    target = resolve(dotted)
                except (AttributeError, ModuleNotFoundError, ImportError) as exc:
                    problems.append(f"{doc.name}: {dotted} does not exist ({exc})")
                    continue
                checked += 1
                params = inspect.signature(target).parameters
                if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                    continue
                for arg in re.findall(r"(?:^|,)\s*([A-Za-z_]\w*)\s*(?==|,|$)", args):
                    if arg not in params:
                        problems.append(f"{doc.name}: {dotted}({args}): no parameter {arg!r}")
    assert checked >= 10, checked
    assert not problems, "\n".join(problems)
