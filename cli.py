"""The ``mtor-node`` command: init, start, status, wallet, ledger.

``main(argv=None) -> int`` never lets an expected error escape as a
traceback: it prints one line naming the problem and returns 1. Anything
else is a bug, and its traceback is shown so it can be reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

from node import __version__
from node import config as config_mod

#: node.pricing.MODEL_TYPES and QUERY_TYPES, written out so that the CLI starts without the signing stack.
ASK_MODEL_TYPES = ("mesh", "claude")
ASK_TYPES = ("chat", "vision", "imagine", "speech", "whisper", "bark")

log = logging.getLogger("mtor-node")


def _expected_errors() -> tuple[type[BaseException], ...]:
    from inference.device import DeviceError
    from inference.remote_spec import RemoteSpecError
    from ledger.errors import LedgerError
    from ledger.wallet_cli import CliError
    from node.capabilities import CapabilityError
    from node.datadir import DataDirError
    from node.genesis import GenesisError
    from node.identity import IdentityError
    from node.runtime import ConsoleBindError
    from p2p.errors import P2PError

    return (
        DataDirError,
        IdentityError,
        GenesisError,
        config_mod.ConfigError,
        DeviceError,
        ConsoleBindError,
        CapabilityError,
        RemoteSpecError,
        P2PError,
        LedgerError,
        CliError,
        CommandError,
    )


class CommandError(Exception):
    """A command cannot do what was asked; the message is for the user."""


def _leaf_errors(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        leaves: list[BaseException] = []
        for inner in exc.exceptions:
            leaves.extend(_leaf_errors(inner))
        return leaves
    return [exc]


def _data_dir(args: argparse.Namespace) -> Path:
    from node.datadir import default_data_dir

    raw = getattr(args, "data_dir", None) or default_data_dir()
    return Path(raw).expanduser().resolve()


# -- init ----------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from node.datadir import DataDir, initialise
    from p2p.host import peer_id_for

    data = DataDir(args.data_dir)
    result = initialise(
        data,
        realm_name=args.realm,
        join_genesis=Path(args.join).expanduser() if args.join else None,
        explicit=True,
    )
    config_mod.load(data.path)
    info = {
        "data_dir": str(data.path),
        "peer_id": peer_id_for(result.identity),
        "address": result.identity.address,
        "realm": result.genesis.realm_hex,
        "realm_name": result.genesis.realm_name,
        "mint_authority": result.identity.public_key in result.genesis.mint_authorities,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        role = "mint authority of a new realm" if info["mint_authority"] else "member"
        print(f"Initialised {info['data_dir']}")
        print(f"Peer id: {info['peer_id']}")
        print(f"Wallet:  {info['address']}")
        print(f"Realm:   {info['realm_name']} ({info['realm']}) — this node is {role}")
        print(f"More nodes: `mtor-node init --join {Path(info['data_dir']) / 'genesis.mtor'}` in a data dir of "
              "their own (a copy of this one would share its key)")
    return 0


# -- start ---------------------------------------------------------------------------


def _split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise CommandError(f"--console expects HOST:PORT, got {text!r}")
    try:
        number = int(port)
    except ValueError as exc:
        raise CommandError(f"--console port must be a number, got {port!r}") from exc
    if not 0 <= number <= 65535:
        raise CommandError(f"--console port {number} is out of range")
    return host.strip("[]"), number


def _start_settings(args: argparse.Namespace, settings: config_mod.Settings) -> config_mod.Settings:
    changes: dict[str, dict] = {"console": {}, "node": {}, "p2p": {}, "inference": {}}
    if args.console:
        host, port = _split_hostport(args.console)
        changes["console"].update(host=host, port=port)
    if args.log_level:
        changes["node"]["log_level"] = args.log_level
    if args.gpu:
        changes["inference"]["gpu"] = True
    if args.no_mdns:
        changes["p2p"]["mdns"] = False
    if args.listen:
        changes["p2p"]["listen"] = ",".join(args.listen)
    if args.bootstrap:
        changes["p2p"]["bootstrap"] = ",".join(args.bootstrap)
    if args.capabilities is not None:
        changes["inference"]["capabilities"] = args.capabilities
    return config_mod.override(settings, changes)


def cmd_start(args: argparse.Namespace) -> int:
    import trio

    from node.datadir import DataDir
    from node.logs import setup_logging
    from node.runtime import RunOptions

    data = DataDir(args.data_dir)
    data.ensure_writable()
    settings, report = config_mod.load(data.path)
    settings = _start_settings(args, config_mod.env_overrides(settings))
    setup_logging(
        settings.node.log_level,
        data.logs_dir,
        max_bytes=settings.node.log_max_bytes,
        backups=settings.node.log_backups,
    )
    if report.quarantined:
        log.warning("config.ini was unusable (%s); kept as %s, defaults written", report.reason, report.quarantined.name)
    options = RunOptions(
        listen=tuple(config_mod.split_list(settings.p2p.listen)),
        bootstrap=tuple(config_mod.split_list(settings.p2p.bootstrap)),
    )
    trio.run(partial(_serve_until_signal, data.path, settings, options))
    log.info("stopped cleanly")
    return 0


async def _serve_until_signal(data_dir: Path, settings: config_mod.Settings, options) -> None:
    import trio

    from node.runtime import Node

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        node = await Node.create(data_dir, settings, options)
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                count = 0
                async for signum in signals:
                    count += 1
                    if count == 1:
                        log.info("received %s", signal.Signals(signum).name)
                        node.request_shutdown()
                        nursery.cancel_scope.deadline = trio.current_time() + settings.node.shutdown_grace_s + 0.5
                    else:
                        log.warning("second signal: stopping now")
                        nursery.cancel_scope.cancel()

            async def run_node(task_status=trio.TASK_STATUS_IGNORED) -> None:
                await node.run(task_status=task_status)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            await nursery.start(run_node)
            print(node.banner(), flush=True)


# -- status --------------------------------------------------------------------------


def control_request(data_dir: Path, path: str, payload: dict | None = None, timeout_s: float = 10.0) -> dict:
    """Call a running node's control API; raise :class:`CommandError` if there is none."""
    from node.datadir import DataDir

    data = DataDir(data_dir)
    runtime = data.read_runtime()
    if not runtime:
        raise CommandError(f"no node is running with data dir {data_dir} (start one with 'mtor-node start')")
    url = runtime["control_url"] + path
    body = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    request.add_header("Authorization", f"Bearer {data.admin_secret()}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
            message = body.get("error") or body.get("message") or exc.reason
        except ValueError:
            body, message = {}, exc.reason
        if body.get("status") in ("failed", "cancelled", "expired"):  # a query that ran and ended badly
            charged = "" if body.get("cost_units") else "; nothing was charged"
            raise CommandError(f"query {body['status']}: {message}{charged}") from exc
        raise CommandError(f"node refused: {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise CommandError(
            f"node at {runtime['control_url']} is not answering (pid {runtime.get('pid')}; "
            f"stale {data.runtime_file.name}?): {getattr(exc, 'reason', exc)}"
        ) from exc


def cmd_status(args: argparse.Namespace) -> int:
    status = control_request(args.data_dir, "/control/status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"Peer id:   {status['peer_id']}")
    print(f"Realm:     {status['realm_name']} ({status['realm']})")
    print(f"Wallet:    {status['address']}")
    print(f"Uptime:    {status['uptime_s']:.0f} s")
    print(f"Console:   {status['console_url']}")
    for addr in status["listen_addrs"]:
        print(f"Listening: {addr}")
    print(f"Peers:     {len(status['peers'])}" + "".join(f"\n  {p}" for p in status["peers"]))
    print(f"Queue:     {status['queue']['depth']} queued, {status['queue']['running']} running")
    print(f"Models:    {', '.join(status['loaded_models']) or 'none loaded'}")
    refused = (status.get("ledger") or {}).get("signing_refused")
    if refused:  # node.key_watch: the node key signs on another node too
        print(f"WARNING:   {refused}")
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    listing = control_request(args.data_dir, "/control/mesh/peers")
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    peers = listing["peers"]
    print(f"Realm {listing['realm'][:16]}…  {len(peers)} known node(s)")
    header = f"{'PEER ID':<54} {'STATE':<11} {'HEALTH':>6} {'DEVICE':<6} {'SEEN':>7}  CAPABILITIES (price)"
    print(header)
    for peer in peers:
        caps = ", ".join(
            f"{name} ({cap['price_milli'] / 1000:g})" for name, cap in sorted(peer["capabilities"].items())
        ) or "none (broker/console only)"
        state = "self" if peer["is_self"] else peer["availability"]
        print(
            f"{peer['peer_id']:<54} {state:<11} {peer['health']:>6} {peer['device']['kind']:<6} "
            f"{peer['last_seen_s_ago']:>6.0f}s  {caps}"
        )
        for addr in peer["addrs"][:3]:
            print(f"    {addr}")
    return 0


def ask_type_and_prompt(words: list[str]) -> tuple[str, str]:
    """``ask`` takes ``[TYPE] PROMPT``: a first word that names a query type is the type, else it is a chat.

    So ``mtor-node ask what is a realm`` just chats; a prompt that starts with a type's name
    (``ask speech is silver``) is a query of that type unless quoted as one word.
    """
    if words[0] in ASK_TYPES:
        return words[0], " ".join(words[1:])
    return "chat", " ".join(words)


def cmd_ask(args: argparse.Namespace) -> int:
    import base64
    import mimetypes

    from node.genesis import tokens_phrase

    query_type, prompt = ask_type_and_prompt(args.words)
    payload = {"type": query_type, "prompt": prompt, "model": args.model or "", "model_type": args.model_type}
    if args.media:
        try:
            payload["media_b64"] = base64.b64encode(Path(args.media).read_bytes()).decode("ascii")
            payload["media_type"] = mimetypes.guess_type(args.media)[0] or "application/octet-stream"
        except OSError as exc:
            raise CommandError(f"cannot read {args.media}: {exc.strerror}") from exc
    outcome = control_request(args.data_dir, "/control/query/ask", payload, timeout_s=args.timeout)
    binary = outcome.get("result_encoding") == "base64"
    if binary and args.out:
        Path(args.out).write_bytes(base64.b64decode(outcome["result"]))
    if args.json:
        print(json.dumps(outcome, indent=2))
        return 0
    if binary:
        where = args.out or "(use --out FILE to save it)"
        print(f"{outcome['result_type']} result, {len(base64.b64decode(outcome['result']))} bytes {where}")
    else:
        print(outcome["result"])
    model = f"{outcome['model']}, " if outcome.get("model") else ""
    print(
        f"-- {tokens_phrase(outcome['cost'])} to {outcome['worker_address']} "
        f"({model}{outcome['processing_time']:.2f} s, waited {outcome['queue_wait']:.2f} s)",
        file=sys.stderr,
    )
    return 0


# -- parser --------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: an option left out sets nothing. With a default, argparse lets a subcommand's
    # parser overwrite what its parent parsed, so `wallet --data-dir D balance` (as the help
    # shows it) ran on $MTOR_HOME instead of D.
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="data directory (default: $MTOR_HOME or ~/.mtor)",
    )


def build_parser() -> argparse.ArgumentParser:
    from inference.models_cli import add_models_parser
    from ledger.wallet_cli import add_ledger_parser, add_wallet_parser
    from node.sim.cli import add_sim_parser

    parser = argparse.ArgumentParser(prog="mtor-node", description="A masterless, speech-first AI mesh node.")
    parser.add_argument("--version", action="version", version=f"mtor-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="create the data dir, node key, config and realm genesis")
    _common(init)
    realm = init.add_mutually_exclusive_group()
    realm.add_argument("--realm", metavar="NAME", help="name of the new realm this node founds")
    realm.add_argument("--join", metavar="GENESIS_FILE", help="join the realm of this genesis file")
    init.add_argument("--json", action="store_true", help="machine-readable output")
    init.set_defaults(func=cmd_init)

    start = sub.add_parser("start", help="run the node (initialises on first start)")
    _common(start)
    start.add_argument("--gpu", action="store_true", default=None, help="run models on CUDA (env MTOR_INFERENCE_GPU)")
    start.add_argument("--console", metavar="HOST:PORT", help="console address (default 127.0.0.1:5000)")
    start.add_argument("--listen", metavar="MULTIADDR", action="append", help="libp2p listen address (repeatable)")
    start.add_argument("--bootstrap", metavar="MULTIADDR", nargs="+", action="extend", help="peers to join")
    start.add_argument("--no-mdns", action="store_true", help="do not look for peers with mDNS")
    start.add_argument("--capabilities", metavar="LIST", help="query types to serve: auto, none, or e.g. chat:reverse,whisper")
    start.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    start.set_defaults(func=cmd_start)

    status = sub.add_parser("status", help="ask the running node how it is")
    _common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    peers = sub.add_parser("peers", help="list the nodes this node knows, with health and prices")
    _common(peers)
    peers.add_argument("--json", action="store_true", help="machine-readable output")
    peers.set_defaults(func=cmd_peers)

    ask = sub.add_parser("ask", help="send a query into the mesh, paid from the node wallet",
                         usage="mtor-node ask [options] [TYPE] PROMPT")
    _common(ask)
    ask.add_argument("words", nargs="+", metavar="[TYPE] PROMPT",
                     help=f"query type, one of {', '.join(ASK_TYPES)} (default: chat), then the prompt "
                          "(its words may go unquoted; whisper and vision may leave it out)")
    ask.add_argument("--model", help="model name (default: any)")
    ask.add_argument("--model-type", choices=ASK_MODEL_TYPES,
                     help="where it runs: mesh or claude, a node's Claude API adapter (× 1.3 the price); "
                          "default: what the workers advertise --model as, else mesh")
    ask.add_argument("--media", metavar="FILE", help="audio or image to send (whisper, vision)")
    ask.add_argument("--out", metavar="FILE", help="write an image or audio result here")
    ask.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    ask.add_argument("--json", action="store_true", help="machine-readable output")
    ask.set_defaults(func=cmd_ask)

    for add in (add_wallet_parser, add_ledger_parser, add_models_parser, add_sim_parser):
        before = set(sub.choices)
        add(sub)
        for name in set(sub.choices) - before:
            _ensure_data_dir_option(sub.choices[name])
    return parser


def _ensure_data_dir_option(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command a --data-dir, so it can go anywhere on the line."""
    if not any("--data-dir" in action.option_strings for action in parser._actions):
        _common(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _ensure_data_dir_option(child)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.data_dir = _data_dir(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    expected = _expected_errors()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - sorted into expected and unexpected below
        if isinstance(exc, SystemExit):
            raise
        leaves = _leaf_errors(exc)
        known = [leaf for leaf in leaves if isinstance(leaf, expected)]
        if known and all(isinstance(leaf, expected + (KeyboardInterrupt,)) for leaf in leaves):
            print(f"mtor-node: error: {known[0]}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
