"""The README and docs/ stay true to the code: docs/commands.md is what the
parser and vmd.errors generate (its exit-code table listed nowhere else), the
README's commands table lists every verb of the CLI parser (and no other), links resolve (anchors included), and the code and tests that
docs/design.md names exist."""

from __future__ import annotations

import argparse
import re
import shlex
import signal
from pathlib import Path

import pytest

import vmd.errors
from vmd import cli, cli_docs

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
COMMANDS_MD = REPO / "docs" / "commands.md"


def _section(text: str, heading: str, doc: Path = README) -> str:
    """The body of the `## heading` section of a Markdown text."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"{doc.name} has no '## {heading}' section"
    return m.group(1)


def _table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of the Markdown tables in `text`."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[\s:|-]+\|$", line):
            # A `\|` inside a cell is a literal bar, not a cell boundary.
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows.append(cells)
    return rows[1:]  # the first row of a table is its header


def _parser() -> argparse.ArgumentParser:
    for name in ("build_parser", "parser", "_parser"):
        build = getattr(cli, name, None)
        if callable(build):
            return build()
    raise AssertionError("vmd.cli has no parser builder (build_parser/_parser)")


def _verbs(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every command path of the parser: ('daemon',), ('plex', 'detach'), ..."""
    out: set[tuple[str, ...]] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                inner = _verbs(sub, prefix + (name,))
                out |= inner or {prefix + (name,)}
    return out


def test_command_reference_is_what_the_parser_generates() -> None:
    """docs/commands.md is `make docs`'s output for the parser and exit codes
    of this tree: a verb, option, help text or exit code changed without
    `make docs` fails here."""
    committed = COMMANDS_MD.read_text()
    assert committed == cli_docs.render(), (
        "docs/commands.md is stale: run `make docs` (python -m vmd.cli_docs > docs/commands.md)")


def test_exit_codes_are_listed_once_from_vmd_errors() -> None:
    constants = {n: v for n, v in vars(vmd.errors).items()
                 if n.startswith("EXIT_") and isinstance(v, int)}
    assert set(vmd.errors.EXIT_MEANINGS) == set(constants.values()), (
        "every exit code of vmd/errors.py has one meaning in EXIT_MEANINGS, and no other")
    rows = _table_rows(_section(COMMANDS_MD.read_text(), "Exit codes", COMMANDS_MD))
    assert {name.strip("`"): int(code) for code, name, _ in rows} == constants
    # The shell's 128 + signal codes say which signal.
    for code, _name, meaning in rows:
        if int(code) > 128:
            assert signal.Signals(int(code) - 128).name in meaning, meaning
    # Listed once: the README and the other documents point to the table.
    for doc in [README, *DOCS]:
        if doc != COMMANDS_MD:
            assert "`EXIT_ERROR`" not in doc.read_text(), f"{doc} repeats the exit-code table"


def test_tests_take_exit_codes_from_vmd_errors() -> None:
    """Tests import the exit codes; none defines its own copy."""
    for path in sorted((REPO / "tests").glob("*.py")):
        redefined = re.findall(r"^(EXIT_\w+)\s*=", path.read_text(), re.M)
        assert not redefined, f"{path.name} defines {redefined}: import them from vmd.errors"


def test_commands_table_lists_every_verb_of_the_parser() -> None:
    rows = _table_rows(_section(README.read_text(), "Commands"))
    listed: set[tuple[str, ...]] = set()
    for row in rows:
        m = re.match(r"`vmd ((?:[a-z][a-z-]*\s?)+)", row[0])
        assert m, f"README.md commands table: cannot read {row[0]!r}"
        listed.add(tuple(m.group(1).split()))
    verbs = _verbs(_parser())
    assert verbs - listed == set(), f"verbs missing from README.md's commands table: {sorted(verbs - listed)}"
    assert listed - verbs == set(), f"README.md lists verbs the CLI does not have: {sorted(listed - verbs)}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_links_resolve(doc: Path) -> None:
    text = doc.read_text()
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http:, mailto:
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not bad, f"{doc.name}: broken links:\n" + "\n".join(bad)


def test_readme_leads_to_install_plex_replacement_and_log_format() -> None:
    """The issue's test of a newcomer: from the README's opening lines, one
    click to how to install and run, to replacing a failed plex, and to the
    sidecar log's record format."""
    opening = README.read_text().split("\n## ", 1)[0]
    for link in ("(#install-and-run)", "(docs/operations.md#replace-a-failed-plex)",
                 "(docs/design.md#the-sidecar-log-format)"):
        assert link in opening, f"README.md's opening does not link {link}"


def test_code_and_tests_named_in_docs_exist() -> None:
    """`vmd/FILE.py:Name.name` and `tests/FILE.py::test_name` in docs/ name real
    definitions, so that a refactor that moves them shows which docs to fix."""
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for file, dotted in re.findall(r"\b(vmd/\w+\.py):([A-Za-z_][\w.]*\w)", text):
            src = (REPO / file).read_text() if (REPO / file).exists() else ""
            for name in dotted.split("."):
                if not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b", src, re.M):
                    missing.append(f"{doc.name}: {file}:{dotted} ({name} not defined)")
        for file, test in re.findall(r"\b(tests/\w+\.py)::(\w+)", text):
            src = (REPO / file).read_text() if (REPO / file).exists() else ""
            if not re.search(rf"^(?:async\s+)?def\s+{test}\(", src, re.M):
                missing.append(f"{doc.name}: {file}::{test}")
        for file in re.findall(r"`(vmd/\w+\.py|bench/\w+\.py|tests/\w+\.py)`", text):
            if not (REPO / file).exists():
                missing.append(f"{doc.name}: {file} does not exist")
    assert not missing, "docs name code that does not exist:\n" + "\n".join(missing)


def test_help_examples_parse_and_cover_every_verb() -> None:
    """`vmd --help` shows one example per verb, and each is a valid command line."""
    parser = _parser()
    cli._refuse_empty_strings(parser)
    examples = [ln.split("#")[0].strip() for ln in parser.epilog.splitlines()
                if ln.strip().startswith("vmd ")]
    shown: set[tuple[str, ...]] = set()
    verbs = _verbs(parser)
    for example in examples:
        argv = shlex.split(example)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit:
            raise AssertionError(f"`vmd --help` example does not parse: {example}") from None
        shown |= {v for v in verbs if tuple(argv[:len(v)]) == v}
    assert verbs - shown == set(), f"verbs without an example in `vmd --help`: {sorted(verbs - shown)}"


def _all_parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
                 ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every verb's parser, groups (`snap`) and their verbs (`snap back`) alike."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [(prefix + (name,), sub), *_all_parsers(sub, prefix + (name,))]
    return out


def _help_examples(help_text: str) -> list[list[str]]:
    """The argv (without `vmd`) of each command of the examples section that
    a `--help` shows, as a shell would split it."""
    section = help_text.partition("\nexamples")[2]
    return [shlex.split(ln, comments=True)[1:] for ln in section.splitlines()
            if ln.startswith("  vmd ")]


def test_every_verb_help_describes_it_with_examples_that_parse() -> None:
    """`vmd VERB --help` (and `vmd snap ACTION --help`...) opens with a
    description and ends with examples of that verb, each a valid command."""
    parser = _parser()
    cli._refuse_empty_strings(parser)
    for path, sub in _all_parsers(parser):
        verb = " ".join(path)
        text = sub.format_help()
        assert sub.description, f"`vmd {verb} --help` has no description"
        examples = _help_examples(text)
        assert examples, f"`vmd {verb} --help` shows no examples:\n{text}"
        for argv in examples:
            assert tuple(argv[:len(path)]) == path, (
                f"`vmd {verb} --help` shows an example of another verb: vmd {shlex.join(argv)}")
            try:
                parser.parse_args(argv)
            except SystemExit:
                raise AssertionError(
                    f"`vmd {verb} --help` example does not parse: vmd {shlex.join(argv)}") from None


def test_every_option_has_help_and_an_example() -> None:
    """Every argument of every verb is described, and every option of a verb
    appears in one of the examples its `--help` shows."""
    parser = _parser()
    undescribed, unshown = [], []
    for path, sub in [((), parser), *_all_parsers(parser)]:
        verb = " ".join(("vmd",) + path)
        used = {arg.split("=")[0] for argv in _help_examples(sub.format_help()) for arg in argv}
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                undescribed += [f"{verb} {c.dest}" for c in action._choices_actions if not c.help]
                continue
            name = "/".join(action.option_strings) or action.metavar or action.dest
            if not action.help or action.help == argparse.SUPPRESS:
                undescribed.append(f"{verb} {name}")
            # The top level's -c/--socket apply to every verb; its examples are the verbs'.
            if path and action.option_strings and not used & set(action.option_strings):
                unshown.append(f"{verb} {name}")
    assert not undescribed, f"arguments without a help string: {undescribed}"
    assert not unshown, f"options no example of their verb's --help shows: {unshown}"
