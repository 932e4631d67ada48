"""``mtor-node models list|convert|remove``: what this node can serve, and its model files."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def add_models_parser(subparsers) -> argparse.ArgumentParser:
    models = subparsers.add_parser("models", help="list, convert and remove local models")
    sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    listing = sub.add_parser("list", help="the models this node would serve, and where they are")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=run_list)

    convert = sub.add_parser("convert", help="turn a transformers or GGUF checkpoint into a CTranslate2 model")
    convert.add_argument("source", type=Path, help="a .gguf file or a transformers model directory")
    convert.add_argument("--out", type=Path, help="output directory (default: <data dir>/models/<name>)")
    convert.add_argument("--quantization", default="int8", choices=("int8", "int8_float16", "float16", "float32"),
                         help="int8 for CPU (default), int8_float16 for CUDA")
    convert.add_argument("--force", action="store_true", help="replace an existing output directory")
    convert.set_defaults(func=run_convert)

    remove = sub.add_parser("remove", help="delete a converted model under <data dir>/models")
    remove.add_argument("name", help="directory name under <data dir>/models (see 'models list')")
    remove.set_defaults(func=run_remove)
    return models


def _settings(data_dir: Path):
    from node import config

    if (data_dir / config.CONFIG_FILE).exists():
        settings, _ = config.load(data_dir)
    else:
        settings = config.Settings()
    return config.env_overrides(settings)


def run_list(args) -> int:
    from inference.convert import is_converted
    from inference.device import Device
    from node.capabilities import QUERY_TYPE_OF, build_backends

    settings = _settings(args.data_dir)
    rows = []
    for backend in build_backends(settings.inference.capabilities, Device("cpu"), args.data_dir / "models",
                                  settings.inference):
        info = backend.describe()
        where = getattr(backend, "model_dir", None) or getattr(backend, "voice", None)
        row = {"query_type": QUERY_TYPE_OF.get(info.capability, info.capability), "name": info.name,
               "models": list(info.models), "path": str(where) if where else None, "memory_mb": info.memory_mb}
        if info.capability == "chat" and where is not None:
            row["converted"] = is_converted(Path(where))
        rows.append(row)
    models_dir = args.data_dir / "models"
    local = sorted(p.name for p in models_dir.iterdir() if p.is_dir()) if models_dir.is_dir() else []
    if args.json:
        print(json.dumps({"serves": rows, "local_models": local}, indent=2))
        return 0
    for row in rows:
        state = "" if "converted" not in row else ("  (converted)" if row["converted"] else "  (converted on first use)")
        print(f"{row['query_type']:<8} {row['name']:<28} {row['path'] or '-'}{state}")
    if not rows:
        print("no models: this node serves nothing (capabilities = none, or nothing installed)")
    if local:
        print(f"in {models_dir}: {', '.join(local)}")
    return 0


def run_convert(args) -> int:
    from inference.base import BackendError
    from inference.convert import convert, converted_name

    out = args.out or args.data_dir / "models" / converted_name(args.source, args.quantization)
    print(f"converting {args.source} -> {out} ({args.quantization}); this takes a while…", file=sys.stderr)
    started = time.monotonic()
    try:
        convert(args.source, out, args.quantization, force=args.force)
    except FileExistsError:
        print(f"mtor-node: error: {out} already exists (use --force to replace it)", file=sys.stderr)
        return 1
    except BackendError as exc:
        print(f"mtor-node: error: {exc}", file=sys.stderr)
        return 1
    print(f"converted in {time.monotonic() - started:.0f} s: {out}")
    return 0


def run_remove(args) -> int:
    models_dir = (args.data_dir / "models").resolve()
    target = (models_dir / args.name).resolve()
    if target.parent != models_dir or not target.is_dir():
        print(f"mtor-node: error: no model named {args.name!r} under {models_dir}", file=sys.stderr)
        return 1
    shutil.rmtree(target)
    print(f"removed {target}")
    return 0
