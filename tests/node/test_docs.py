"""docs/operator-guide.md stays true: every config key and every command's flags are documented."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from cli import build_parser
from node import config

DOCS = Path(__file__).resolve().parents[2] / "docs"
GUIDE = (DOCS / "operator-guide.md").read_text()
LEDGER = (DOCS / "ledger.md").read_text()


def test_every_config_key_is_documented():
    for section_field in fields(config.Settings):
        assert f"[{section_field.name}]" in GUIDE
        for key in fields(section_field.default_factory()):
            assert f"`{key.name}`" in GUIDE, key.name


def _flags(parser: argparse.ArgumentParser, command: str = "") -> list[tuple[str, str]]:
    """(command, --flag) for ``parser`` and every subcommand under it."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _flags(sub, f"{command} {name}".strip())
        found += [(command, flag) for flag in action.option_strings if flag.startswith("--") and flag != "--help"]
    return found


def test_every_command_flag_is_documented():
    """In the guide; wallet and ledger commands may be documented in docs/ledger.md instead."""
    for command, flag in _flags(build_parser()):
        doc = GUIDE + LEDGER if command.startswith(("wallet", "ledger")) else GUIDE
        assert flag in doc, f"mtor-node {command} {flag}"
