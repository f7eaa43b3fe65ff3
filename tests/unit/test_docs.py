"""README.md and docs/ cannot rot: every relative link (and its #anchor) leads somewhere, every repository path
they name exists, and every `phalanx ...` command line they show parses with the real parser, options and
values included (the training config is built from it, as `phalanx train` would)."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from phalanx import config as C
from phalanx.commands import COMMANDS
from phalanx.commands.args import parse

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
PACKAGES = ("commands", "tools", "train", "parallel", "data", "models", "runtime", "observe")
TOP = ("src", "tests", "benchmarks", "docs", "recipes", ".ci")
FILE_SUFFIX = re.compile(r"\.(py|md|toml|sh|json|jsonl|png|cfg|txt)$")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|_(?=\W)|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    out, seen = set(), {}
    fenced = False
    for line in md.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*)", line)):
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def prose(md: Path) -> str:
    """The page without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)


def test_every_relative_link_and_anchor_exists():
    broken = []
    for md in DOCS:
        for m in LINK.finditer(prose(md)):
            target = m.group(1) or m.group(2)
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def named_paths(md: Path) -> list[str]:
    """Code spans that name a file or folder of this repository (src/..., tests/..., train/step.py, ...)."""
    out = []
    for span in CODE_SPAN.findall(md.read_text()):
        token = span.strip().split()[0] if span.strip() else ""
        first = token.split("/")[0]
        if "/" in token and (first in TOP or first in PACKAGES) and not any(c in token for c in "*<>{}$~[]") \
                and (FILE_SUFFIX.search(token) or token.endswith("/")):
            out.append(token)
    return out


def exists_in_repo(token: str) -> bool:
    token = token.split(":")[0]
    return any((base / token).exists() for base in (ROOT, ROOT / "src" / "phalanx", ROOT / "tests" / "unit"))


def test_every_repository_path_the_docs_name_exists():
    missing = [f"{md.relative_to(ROOT)}: {t}" for md in DOCS for t in named_paths(md) if not exists_in_repo(t)]
    assert missing == []


COMMAND_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
"""The pages whose command lines must parse today (benchmarks/README.md is dated: its lines ran on their day)."""

SHOWN_AS_ERRORS = {("docs/training.md", "phalanx train --optim.lr=-1")}
"""Command lines a page shows for the one-line error they get: they must still be refused."""

PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # RUN_DIR, N, F: a value the reader fills in


def command_lines(md: Path) -> list[tuple[str, bool]]:
    """(`phalanx ...` line, whole) for the page's code blocks (whole: a command to run) and code spans (which
    may name a command or an option without its value), without comments and usage patterns."""
    text = md.read_text()
    candidates = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        candidates += [(line, True) for line in block.replace("\\\n", " ").splitlines()]
    candidates += [(span, False) for span in CODE_SPAN.findall(prose(md))]
    out = []
    for line, whole in candidates:
        line = re.sub(r"\s+#\s.*$", "", line.strip()).removeprefix("$ ").strip()
        words = line.split()
        while words and re.match(r"[A-Z_][A-Z0-9_]*=", words[0]):
            words = words[1:]  # environment variables set for the command
        if len(words) < 2 or not (words[0] == "phalanx" or words[0].endswith("/phalanx")):
            continue
        line = " ".join(words)
        if re.search(r"\[|\||\.\.\.|…", line) or words[1] == "COMMAND":
            continue  # a usage pattern, not a command line
        out.append((line, whole))
    return out


ALL_LINES = sorted({(str(md.relative_to(ROOT)), line, whole) for md in COMMAND_PAGES
                    for line, whole in command_lines(md)})


def _spec_of(argv: list[str]):
    """(name, Command, the arguments after the command's name) of `phalanx ARGV`."""
    name = argv[0]
    assert name in COMMANDS, f"unknown command {name!r}"
    module = importlib.import_module(f"phalanx.commands.{COMMANDS[name]}")
    cmd, rest = module.COMMANDS[name], argv[1:]
    if callable(cmd):  # a group: data, bench
        if not rest or rest[0] in ("-h", "--help"):
            return name, None, rest
        assert rest[0] in module.SUBCOMMANDS, f"unknown sub-command {rest[0]!r} of {name}"
        name, cmd, rest = f"{name} {rest[0]}", module.SUBCOMMANDS[rest[0]], rest[1:]
    return name, cmd, rest


def parse_line(line: str, whole: bool = True, tmp: Path | None = None) -> None:
    """Parse a `phalanx ...` line as the command would, without running it: ConfigError (or AssertionError)
    where the command would refuse it. An option whose value is a placeholder (`--nproc N`), or that ends a
    code span (`--nproc`), is checked by name only."""
    name, cmd, rest = _spec_of(shlex.split(line)[1:])
    if cmd is None:
        return
    named, argv, i = [], [], 0
    while i < len(rest):
        a = rest[i]
        nxt = rest[i + 1] if i + 1 < len(rest) else None
        if a.startswith("--") and "=" not in a and ((nxt is not None and PLACEHOLDER.match(nxt))
                                                     or (nxt is None and not whole)):
            named.append(a[2:])
            i += 2
            continue
        if a.startswith("--recipe") and tmp is not None:  # a recipe file of the reader's: an empty one stands in
            value = a.partition("=")[2] or nxt
            if value and value.endswith(".toml") and not Path(value).exists():
                (tmp / Path(value).name).write_text("")
                argv += ["--recipe", str(tmp / Path(value).name)]
                i += 1 if "=" in a else 2
                continue
        argv.append(a)
        i += 1
    parsed = parse(name, cmd.spec, argv)
    own = {o.name for o in cmd.spec.options}
    for key in named:
        if key not in own:
            assert cmd.spec.config, f"--{key}: no such option of phalanx {name}"
            C.canonical_key({"data": "data.path"}.get(key, key))  # ConfigError for an unknown field
    if parsed.help:
        return
    if whole:
        assert len(parsed.positional) >= cmd.spec.positionals[0], f"{line}: too few arguments for phalanx {name}"
    if cmd.spec.config:
        C.build_config(parsed.recipe, parsed.pairs)


def test_the_docs_show_command_lines():
    assert len(ALL_LINES) >= 30  # the reader above finds them: an empty list would prove nothing


@pytest.mark.parametrize("page,line,whole", ALL_LINES)
def test_every_command_line_in_the_docs_parses(page, line, whole, tmp_path):
    if (page, line) in SHOWN_AS_ERRORS:
        from phalanx.errors import ConfigError
        with pytest.raises(ConfigError):
            parse_line(line, whole, tmp_path)
    else:
        parse_line(line, whole, tmp_path)


def test_a_wrong_command_line_is_caught():
    from phalanx.errors import ConfigError
    with pytest.raises(ConfigError):
        parse_line("phalanx train --optim.lrr 0.1")
    with pytest.raises(ConfigError):
        parse_line("phalanx train --epochs many")
    with pytest.raises(AssertionError):
        parse_line("phalanx evaluate runs/x")
    with pytest.raises(ConfigError):
        parse_line("phalanx train --nprocs N")  # an option that does not exist, even with a placeholder
    with pytest.raises(AssertionError):
        parse_line("phalanx eval")  # a code block's command line needs its arguments
