"""The docs as tests: every `paced …` command they quote exists, with its options, and every link resolves.

Commands are read from code (fenced blocks and inline `code`) in README.md and docs/*.md; each
one's `--help` must work, and every option quoted with it must be in that help.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from paced.cli import COMMANDS, command_parser, main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"(?<![\w./-])paced ([a-z][a-z-]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def code_of(text: str) -> list[str]:
    """Fenced blocks (continuation lines joined) and inline code spans outside them."""
    blocks = [block.replace("\\\n", " ") for block in FENCE.findall(text)]
    return blocks + INLINE.findall(FENCE.sub("", text))


def quoted_commands() -> list[tuple[str, str]]:
    """(page, command line) for every `paced COMMAND …` quoted in code, up to a shell operator."""
    found = []
    for page in PAGES:
        for code in code_of(page.read_text()):
            for line in code.splitlines():
                for match in COMMAND.finditer(line):
                    if match.group(1) in COMMANDS:
                        rest = re.split(r"\s(?:#|\||&|;|>>?)", line[match.start() :])[0]
                        found.append((page.relative_to(ROOT).as_posix(), rest.strip()))
    return sorted(set(found))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def parser_for(words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser of `paced WORDS…` (a subcommand's own when it has them) and the argv to its --help."""
    parser, _ = command_parser(words[1])
    argv = [words[1]]
    subs = subcommands(parser)
    if subs and len(words) > 2 and words[2] in subs:
        parser, argv = subs[words[2]], argv + [words[2]]
    return parser, argv


def test_the_docs_quote_commands_at_all():
    quoted = {line.split()[1] for _, line in quoted_commands()}
    assert {"demo", "import", "train", "serve", "tasks", "refresh"} <= quoted


@pytest.mark.parametrize(("page", "line"), quoted_commands())
def test_every_quoted_command_exists_and_its_options_are_in_its_help(page, line, capsys):
    if re.match(r"paced [a-z-]+ {2}", line):  # a table of commands: the name, then what it does
        words = line.split()[:2]
    else:
        words = shlex.split(line.replace("…", ""), posix=True)
    _, argv = parser_for(words)
    assert main([*argv, "--help"]) == 0, f"{page}: `{line}`"
    help_text = capsys.readouterr().out
    for word in words[len(argv) + 1 :]:
        flag = word.strip("[]").split("=", 1)[0]
        if re.fullmatch(r"--?[a-zA-Z][\w-]*", flag):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
                f"{page}: `{line}` quotes {flag}, which `paced {' '.join(argv)} --help` does not list"
            )
    if subcommands(command_parser(words[1])[0]) and len(words) > 2:
        assert len(argv) == 2, f"{page}: `{line}` names no subcommand of `paced {words[1]}`"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def links() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if not re.match(r"[a-z]+:", target):
                found.append((page.relative_to(ROOT).as_posix(), target))
    return found


@pytest.mark.parametrize(("page", "target"), links())
def test_every_docs_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    resolved = (ROOT / page).parent / path if path else ROOT / page
    assert resolved.exists(), f"{page}: link to {target}, but {resolved.relative_to(ROOT)} does not exist"
    if anchor:
        assert resolved.suffix == ".md" and anchor in anchors(resolved), (
            f"{page}: link to {target}, but {resolved.relative_to(ROOT)} has no heading with anchor #{anchor}"
        )


def test_the_readme_stays_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines; move detail into docs/"


def documented_endpoints() -> set[tuple[str, str]]:
    """(method, path) of every `GET /v1/…` / `POST /v1/…` the docs quote; `{…}` parameters as `X`."""
    found = set()
    for page in PAGES:
        for code in code_of(page.read_text()):
            for method, path in re.findall(r"\b(GET|POST|PUT|DELETE) (/v1/[^\s?`]*)", code):
                found.add((method, re.sub(r"\{[^}]*\}", "X", path)))
    return found


def test_every_documented_endpoint_is_served(tmp_path):
    from paced.api.app import create_app
    from paced.api.settings import Settings

    app = create_app(Settings(home=tmp_path))
    served = [
        (method, re.compile(re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(route.path))))
        for route in app.routes for method in getattr(route, "methods", ()) or ()
    ]
    documented = documented_endpoints()
    missing = sorted(
        (method, path) for method, path in documented
        if not any(m == method and pattern.fullmatch(path) for m, pattern in served)
    )
    assert len(documented) >= 8 and missing == []
