"""config.ini heals itself and never loses what the operator wrote."""

from __future__ import annotations

import configparser

import pytest

from node import config


def test_first_load_writes_commented_defaults(tmp_path):
    settings, report = config.load(tmp_path)
    assert report.created
    text = (tmp_path / "config.ini").read_text()
    assert "port = 5000" in text and "# Console port" in text
    assert settings.console.port == 5000
    assert settings.queue.max_queue_size == 100
    assert settings.console.max_ws_message_bytes == 1024 * 1024


def test_missing_keys_are_filled_and_operator_values_kept(tmp_path):
    (tmp_path / "config.ini").write_text("[console]\n# my comment\nport = 6000\n\n[p2p]\nmdns = false\n")
    settings, report = config.load(tmp_path)
    assert settings.console.port == 6000 and settings.p2p.mdns is False
    assert "console.host" in report.filled and "queue.max_queue_size" in report.filled
    text = (tmp_path / "config.ini").read_text()
    assert "# my comment" in text and "port = 6000" in text
    parser = configparser.ConfigParser()
    parser.read_string(text)
    assert parser.get("queue", "max_queue_size") == "100"
    assert parser.get("console", "host") == "127.0.0.1"
    _, again = config.load(tmp_path)
    assert again.filled == ()


def test_unparsable_file_is_kept_aside_and_replaced(tmp_path):
    original = "this is [not an ini file\n"
    (tmp_path / "config.ini").write_text(original)
    settings, report = config.load(tmp_path)
    assert report.quarantined is not None
    assert report.quarantined.name.startswith("config.ini.bad-")
    assert report.quarantined.read_text() == original
    assert settings == config.Settings()


def test_bad_value_is_kept_aside(tmp_path):
    (tmp_path / "config.ini").write_text("[console]\nport = five thousand\n")
    _, first = config.load(tmp_path)
    assert "port" in first.reason
    (tmp_path / "config.ini").write_text("[console]\nport = also bad\n")
    _, second = config.load(tmp_path)
    assert first.quarantined != second.quarantined
    assert first.quarantined.exists() and second.quarantined.exists()


def test_a_key_with_choices_refuses_any_other_value(tmp_path):
    (tmp_path / "config.ini").write_text("[node]\nlog_level = verbose\n")
    settings, report = config.load(tmp_path)
    assert "log_level" in report.reason and "debug, info, warning, error" in report.reason
    assert settings.node.log_level == "info" and report.quarantined.exists()
    (tmp_path / "config.ini").write_text("[node]\nlog_level = DEBUG\n[operator]\nmode = Peaking\n")
    settings, report = config.load(tmp_path)
    assert report.quarantined is None and (settings.node.log_level, settings.operator.mode) == ("debug", "peaking")
    with pytest.raises(config.ConfigError, match="MTOR_OPERATOR_MODE: 'sometimes' is not one of base, peaking"):
        config.env_overrides(settings, {"MTOR_OPERATOR_MODE": "sometimes"})


def test_unknown_keys_reported_not_dropped(tmp_path):
    (tmp_path / "config.ini").write_text("[console]\nprot = 1\n")
    _, report = config.load(tmp_path)
    assert report.unknown == ("console.prot",)
    assert "prot = 1" in (tmp_path / "config.ini").read_text()


def test_env_and_override(tmp_path):
    settings, _ = config.load(tmp_path)
    settings = config.env_overrides(settings, {"MTOR_CONSOLE_PORT": "7001", "MTOR_P2P_MDNS": "no"})
    assert settings.console.port == 7001 and settings.p2p.mdns is False
    settings = config.override(settings, {"console": {"port": 7002}})
    assert settings.console.port == 7002
    with pytest.raises(config.ConfigError, match="MTOR_QUEUE_MAX_QUEUE_SIZE"):
        config.env_overrides(settings, {"MTOR_QUEUE_MAX_QUEUE_SIZE": "lots"})
    assert "port = 5000" in (tmp_path / "config.ini").read_text()  # overrides are for one run only


def test_cli_flags_override_for_one_run(tmp_path):
    from tests.harness import NodeProcess

    node = NodeProcess(tmp_path / "n").start()
    try:
        assert node.console_url != "http://127.0.0.1:5000/"
    finally:
        node.stop()
        node.kill()
    assert "port = 5000" in (tmp_path / "n" / "config.ini").read_text()
