"""What `vmd --help` and `vmd VERB --help` show. Each verb's summary and
examples are given once, where its parser is built (`add_verb`); the example
lists of a group (`vmd snap --help`) and of `vmd --help` are gathered from the
verbs under it by `set_epilogs`, so that no list of examples is kept beside
the verbs it describes."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from typing import Any

# An example command line, or (command line, a comment shown after it).
Example = str | tuple[str, str]

VOLUME_HELP = "the volume's name (as `vmd status` lists it)"
SNAPSHOT_HELP = "a snapshot's name: the volume `vmd snap take` made"
# Where comments start in an example list; a longer command pushes its own further.
_COMMENT_COLUMN = 42


class VerbParser(argparse.ArgumentParser):
    """An argparse parser that knows its verb's examples. Subparsers of a
    VerbParser are VerbParsers too (argparse's default `parser_class`)."""

    def __init__(self, *args: Any, examples: Sequence[Example] = (), **kwargs: Any) -> None:
        # Raw: the epilog's example lines keep their alignment.
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.examples: list[tuple[str, str]] = [
            (e, "") if isinstance(e, str) else e for e in examples]


def add_verb(sub: Any, name: str, summary: str,
             examples: Sequence[Example] = ()) -> VerbParser:
    """A verb of `sub` (an add_subparsers action of a VerbParser): `summary`
    is both its line in the parent's list and its own `--help` description."""
    parser: VerbParser = sub.add_parser(name, help=summary, description=summary,
                                        examples=examples)
    return parser


def subverbs(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers of `parser`'s verbs, each once (aliases share a parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from dict.fromkeys(action.choices.values())


def all_examples(parser: argparse.ArgumentParser, first_only: bool = False) -> list[tuple[str, str]]:
    """`parser`'s own examples, then those of every verb under it, in the
    order the verbs were added; `first_only`: one per verb."""
    own = list(getattr(parser, "examples", []))
    out = own[:1] if first_only else own
    for sub in subverbs(parser):
        out += all_examples(sub, first_only)
    return out


def format_examples(examples: Sequence[tuple[str, str]], heading: str = "examples:") -> str:
    lines = [heading]
    for command, comment in examples:
        if comment:
            command = f"{command:<{_COMMENT_COLUMN - 2}}  # {comment}"
        lines.append(f"  {command}")
    return "\n".join(lines)


def set_epilogs(parser: argparse.ArgumentParser, heading: str, footer: str) -> None:
    """Give `parser` (the top level: one example per verb, under `heading`,
    then `footer`) and every verb under it (all their examples) an epilog."""
    parser.epilog = f"{format_examples(all_examples(parser, first_only=True), heading)}\n{footer}"

    def verbs(p: argparse.ArgumentParser) -> None:
        for sub in subverbs(p):
            sub.epilog = format_examples(all_examples(sub))
            verbs(sub)

    verbs(parser)
