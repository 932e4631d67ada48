"""docs/operator-guide.md stays true: every config key and start flag is documented."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from cli import build_parser
from node import config

GUIDE = (Path(__file__).resolve().parents[2] / "docs" / "operator-guide.md").read_text()


def test_every_config_key_is_documented():
    for section_field in fields(config.Settings):
        assert f"[{section_field.name}]" in GUIDE
        for key in fields(section_field.default_factory()):
            assert f"`{key.name}`" in GUIDE, key.name


def test_every_start_flag_is_documented():
    parser = build_parser()
    start = parser._subparsers._group_actions[0].choices["start"]
    for action in start._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert flag in GUIDE, flag
