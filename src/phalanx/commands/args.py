"""The one way every `phalanx` command reads its arguments.

Two kinds of options, one syntax (`--key=value`, `--key value`, a bare `--flag`):
- a command's own options, declared as `Option`s in its `Spec` (typed, with choices and a minimum), and
- for `train`, `eval` and `tune`, every field of the typed config (`--optim.lr 0.1`, `--lr 0.1`), which stays
  the source of truth: they are handed on as (key, value) pairs to `config.build_config`, which checks them.
A mistake is one `ConfigError` line (exit code 2) naming the option and the fix, with a did-you-mean hint.

Why not argparse: its errors are a usage block plus a line (not one line), it claims unambiguous prefixes of
options (`--nproc` would match torchrun's `--nproc-per-node`), and a config of ~150 dotted fields would need
one `add_argument` each; the config already knows their types, defaults and docstrings.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from phalanx import config as C
from phalanx.errors import ConfigError
from phalanx.paths import check_path


@dataclass(frozen=True)
class Option:
    """One option of a command: `--NAME VALUE` (or `--NAME` alone when `flag`)."""
    name: str
    """As typed, without the dashes: `top`, `skip-bad`. Its value is the attribute with `-` read as `_`."""
    help: str
    type: Callable[[str], Any] = str
    """int, float, str or Path: how the typed text becomes the value (a Path goes through paths.check_path)."""
    default: Any = None
    choices: tuple = ()
    flag: bool = False
    """Takes no value: True when given, else False."""
    minimum: int | None = None
    metavar: str = ""

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def convert(self, command: str, raw: str) -> Any:
        if self.type is int:
            text = raw.strip()
            if not (text.lstrip("-").isdecimal() and len(text) <= 18):
                raise ConfigError(f"--{self.name} {raw}: must be a whole number{self._least()} "
                                  f"(phalanx {command} --help)")
            value: Any = int(text)
        elif self.type is float:
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"--{self.name} {raw}: must be a number (phalanx {command} --help)") from None
        else:
            if raw == "":
                raise ConfigError(f"--{self.name} needs a value (phalanx {command} --help)")
            value = check_path(raw, f"--{self.name}") if self.type is Path else self.type(raw)
        if self.choices and value not in self.choices:
            raise ConfigError(f"--{self.name} {raw}: choose one of {', '.join(map(str, self.choices))}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"--{self.name} {raw}: must be a whole number{self._least()}")
        return value

    def _least(self) -> str:
        return f" >= {self.minimum}" if self.minimum is not None else ""


@dataclass(frozen=True)
class Spec:
    """What a command takes: its usage line, what it does, its positional arguments and options."""
    usage: str
    """`phalanx predict RUN_DIR|WEIGHTS IMAGE|FOLDER... [options]`"""
    about: str
    options: tuple[Option, ...] = ()
    positionals: tuple[int, int | None] = (0, 0)
    """How many positional arguments: (at least, at most; None: no limit)."""
    paths: bool = False
    """The positional arguments are files or folders: each goes through paths.check_path."""
    config: bool = False
    """Also takes every field of the training config (and --recipe): train, eval, tune."""
    passthrough: bool = False
    """What follows a bare `--` is kept as it is, in `extra` (options for the `phalanx train` runs it makes)."""
    epilog: str = ""

    def help(self) -> str:
        lines = [f"usage: {self.usage}", "", self.about.strip()]
        if self.options:
            lines += ["", "options:"]
            for o in self.options:
                head = f"--{o.name}" + ("" if o.flag else f" {o.metavar or _metavar(o)}")
                default = "" if o.flag or o.default in (None, "", ()) else f" (default {o.default})"
                lines.append(f"  {head:<22} {o.help}{default}")
            lines.append(f"  {'-h, --help':<22} show this help")
        if self.epilog:
            lines += ["", self.epilog.strip()]
        return "\n".join(lines)


def _metavar(o: Option) -> str:
    if o.choices:
        return "|".join(map(str, o.choices))
    return {int: "N", float: "X", Path: "PATH"}.get(o.type, "VALUE")


@dataclass
class Parsed:
    """What a command line says: positionals, the command's options, config pairs, and the rest after `--`."""
    positional: list[str]
    values: SimpleNamespace
    pairs: list[tuple[str, str]] = field(default_factory=list)
    """(config key, raw value) in the order given; `--data X` is `data.path`."""
    recipe: str | None = None
    extra: list[str] = field(default_factory=list)
    help: bool = False
    argv: list[str] = field(default_factory=list)
    """The arguments as given (what the launcher hands on to its ranks)."""

    def explicit_keys(self) -> set[str]:
        """The config fields the user set (command line, or a recipe the user named): `auto` leaves them alone."""
        named = C.recipe_keys(C.resolve_recipe(self.recipe)) if self.recipe else set()
        return {C.canonical_key(k) for k, _ in self.pairs} | named


CONFIG_SHORTCUTS = {"data": "data.path"}
"""Option names that stand for a longer config key."""


def parse(command: str, spec: Spec, argv: Sequence[str]) -> Parsed:
    """Read `argv` against `spec`; ConfigError (one line, exit 2) for an option the command does not take, a
    value of the wrong kind, or too many positional arguments. Too few is left to the caller (it prints help)."""
    own = {o.name: o for o in spec.options} | {o.dest: o for o in spec.options}
    out = Parsed([], SimpleNamespace(**{o.dest: (False if o.flag else o.default) for o in spec.options}))
    i, argv = 0, list(argv)
    out.argv = list(argv)
    while i < len(argv):
        a = argv[i]
        i += 1
        if a in ("-h", "--help"):
            out.help = True
        elif a == "--" and spec.passthrough:
            out.extra, i = argv[i:], len(argv)
        elif a.startswith("--") and len(a) > 2:
            key, eq, val = a[2:].partition("=")
            opt = own.get(key)
            if opt is not None:
                if opt.flag:
                    if eq:
                        raise ConfigError(f"--{opt.name} takes no value (give --{opt.name} alone)")
                    setattr(out.values, opt.dest, True)
                    continue
                if not eq:
                    if i >= len(argv) or argv[i].startswith("--"):
                        raise ConfigError(f"--{opt.name} needs a value, e.g. --{opt.name} "
                                          f"{opt.metavar or _metavar(opt)} (phalanx {command} --help)")
                    val, i = argv[i], i + 1
                setattr(out.values, opt.dest, opt.convert(command, val))
            elif spec.config:
                if not eq:  # `--k v`, or a bare `--flag` (true)
                    if i < len(argv) and not argv[i].startswith("--"):
                        val, i = argv[i], i + 1
                    else:
                        val = "true"
                _config_value(out, key, val)
            else:
                raise ConfigError(f"unknown option --{key} for `phalanx {command}`"
                                  f"{did_you_mean('--' + key, ['--' + o.name for o in spec.options])} "
                                  f"(phalanx {command} --help)")
        else:
            if spec.paths:
                check_path(a)
            out.positional.append(a)
    least, most = spec.positionals
    if most is not None and len(out.positional) > most and not out.help:
        extra = out.positional[most]
        raise ConfigError(f"unexpected argument {extra!r} for `phalanx {command}`"
                          + (" (options look like --optim.lr=0.1)" if spec.config else f" (phalanx {command} --help)"))
    return out


def _config_value(out: Parsed, key: str, val: str) -> None:
    """`--recipe R` or a config field's `--KEY VALUE`; a path goes through paths.check_path first, before anything
    looks up a name too long or a link loop (an OSError from deep inside)."""
    if key == "recipe" or _names_a_path(CONFIG_SHORTCUTS.get(key, key)):
        check_path(val, f"--{key}", f"choose another --{key}")
    if key == "recipe":
        out.recipe = val
    else:
        out.pairs.append((CONFIG_SHORTCUTS.get(key, key), val))


def _names_a_path(key: str) -> bool:
    """`key` is a config field that names a file or folder (config.PATH_KEYS); an unknown key is left to
    `config.build_config`, which says so with a did-you-mean hint."""
    try:
        return C.canonical_key(key) in C.PATH_KEYS
    except ConfigError:
        return False


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


Handler = Callable[[Parsed], int]


@dataclass(frozen=True)
class Command:
    """A command (or a sub-command of a group): what it takes, and the function that runs it."""
    spec: Spec
    run: Handler


def run_command(name: str, cmd: Command, argv: Sequence[str]) -> int:
    """Parse `argv` for `cmd` and run it; help (exit 0), or help for too few positionals (exit 2)."""
    parsed = parse(name, cmd.spec, argv)
    if parsed.help or len(parsed.positional) < cmd.spec.positionals[0]:
        print(cmd.spec.help())
        return 0 if parsed.help else 2
    return cmd.run(parsed)


def run_group(name: str, about: str, table: dict[str, Command], argv: Sequence[str]) -> int:
    """`phalanx NAME SUB ...`: the sub-command's own parse; without one, the list of them (exit 2)."""
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, table))
        print(f"usage: phalanx {name} {'|'.join(table)} [options]   (phalanx {name} SUB --help for each)\n\n"
              f"{about}\n\n" + "\n".join(f"  {k:<{width}}  {c.spec.about.strip().splitlines()[0]}"
                                         for k, c in table.items()))
        return 0 if argv else 2
    sub = table.get(argv[0])
    if sub is None:
        raise ConfigError(f"unknown sub-command {argv[0]!r} for `phalanx {name}`{did_you_mean(argv[0], list(table))}; "
                          f"choose {', '.join(table)}")
    return run_command(f"{name} {argv[0]}", sub, argv[1:])
