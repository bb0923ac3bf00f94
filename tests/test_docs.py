"""Every command quoted in README.md and docs/*.md is a real entry point with real flags: each is handed to
its script's argparse (parsed, never run). A renamed flag or file fails here instead of in a reader's shell."""

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

import flags

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_OURS = ("pytest", "pip")  # python -m pytest / pip: other programs' flags


def commands(text: str) -> list[str]:
    """The shell commands of a markdown text: each line of a fenced block (backslash continuations joined,
    comments dropped, split at && ; |), and every inline code span that starts with python or torchrun."""
    out = []
    fenced = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, flags=re.S)
    for block in fenced:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            out += [c.strip() for c in re.split(r"&&|;|\|", line) if c.strip()]
    rest = re.sub(r"```.*?```", "", text, flags=re.S)
    out += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", rest)]
    return [c for c in out if re.match(r"(\w+=\S+\s+)*(python3?|torchrun)\s", c)]


def entry_point(cmd: str) -> tuple[str, str, list[str]] | None:
    """(kind, target, argv) for `python X.py ...`, `python -m pkg.mod ...`, `torchrun ... X.py ...`;
    None for programs that are not this project's."""
    words = [w for w in shlex.split(cmd) if w != "..."]
    while "=" in words[0]:
        words.pop(0)  # VAR=value prefixes
    prog, words = words[0], words[1:]
    if prog == "torchrun":
        while not words[0].endswith(".py"):  # torchrun's own options: --opt value, or --opt=value
            words = words[1:] if "=" in words[0] else words[2:]
    if words[0] == "-m":
        return None if words[1] in NOT_OURS else ("module", words[1], words[2:])
    if not words[0].endswith(".py") or words[0].startswith(".."):
        return None  # a tool outside the project (../shared/...)
    return "path", words[0], words[1:]


class Parsed(Exception):
    """Raised right after a script's argparse accepted its flags, before the script does any work."""


def parse_only(kind: str, target: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [target, *argv])
    try:
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=False)
        else:
            path = ROOT / target
            assert path.is_file(), f"{target}: no such script"
            assert "parse_args(" in path.read_text(), f"{target} parses no flags: it would run here"
            monkeypatch.syspath_prepend(str(path.parent))  # as `python X.py` puts X's folder first
            runpy.run_path(str(path), run_name="__main__")
    except Parsed as done:
        return done.args[0]
    finally:
        monkeypatch.undo()
    raise AssertionError(f"{target} returned without parsing its flags")


ALL = [(doc.name, cmd) for doc in DOCS for cmd in commands(doc.read_text())]


def test_the_docs_quote_the_commands_a_newcomer_runs():
    quoted = {c for _, c in ALL}
    assert "python train.py --algo grpo" in quoted  # the main command
    assert any(c.startswith("python train.py --algo grpo --agent manager") for c in quoted)
    assert any(c.startswith("python evaluate.py") for c in quoted)
    assert len(ALL) > 30


@pytest.mark.parametrize("doc,cmd", ALL, ids=[f"{d}:{c[:60]}" for d, c in ALL])
def test_every_quoted_command_parses(doc, cmd, monkeypatch):
    found = entry_point(cmd)
    if found is None:
        pytest.skip("not this project's entry point")
    try:
        ns = parse_only(*found, monkeypatch)
    except SystemExit as e:  # argparse refuses a flag: its message went to stderr
        raise AssertionError(f"{doc}: `{cmd}` is refused by its argparse (exit {e.code})") from None
    if isinstance(getattr(ns, "flags", None), str):  # bench scripts pass --flags "..." on to train.py
        flags.parse_args(shlex.split(ns.flags))


def test_a_wrong_flag_is_caught(monkeypatch):
    with pytest.raises(SystemExit):
        parse_only("path", "train.py", ["--algo", "dpo"], monkeypatch)
    with pytest.raises(SystemExit):
        parse_only("path", "evaluate.py", ["--no-such-flag"], monkeypatch)
    assert parse_only("path", "train.py", ["--algo", "ppo"], monkeypatch).algo == "ppo"
