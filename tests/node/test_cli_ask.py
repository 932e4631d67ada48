"""``mtor-node ask [TYPE] PROMPT``: how the command line's words become a query's type and prompt."""

from __future__ import annotations

import pytest

from cli import ASK_TYPES, build_parser, ask_type_and_prompt
from node.pricing import QUERY_TYPES


def words_of(*argv: str) -> tuple[str, str]:
    return ask_type_and_prompt(build_parser().parse_args(["ask", *argv]).words)


def test_the_cli_knows_every_query_type_the_broker_prices():
    assert sorted(ASK_TYPES) == sorted(QUERY_TYPES)


@pytest.mark.parametrize(("argv", "expected"), [
    (("chat", "hello there"), ("chat", "hello there")),
    (("hello there",), ("chat", "hello there")),  # no type: a chat
    (("what", "is", "a", "realm?"), ("chat", "what is a realm?")),  # unquoted words join
    (("imagine", "a", "red", "cat"), ("imagine", "a red cat")),
    (("whisper", "--media", "talk.wav"), ("whisper", "")),  # the audio is the query
    (("speech is silver",), ("chat", "speech is silver")),  # quoted: one word, not a type
    (("vision", "", "--model", "m"), ("vision", "")),
])
def test_a_first_word_naming_a_type_is_the_type(argv, expected):
    assert words_of(*argv) == expected


def test_a_prompt_is_needed(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ask", "--json"])
    assert "[TYPE] PROMPT" in capsys.readouterr().err
