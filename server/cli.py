"""The ``loraplex`` command: dispatches to the packages; holds no logic of its own."""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import get_args

import yaml
from pydantic import ValidationError

from server.config import Settings

# Subcommands implemented by other packages: name -> (module, function taking argv).
_DELEGATED = {
    "train": ("training.cli", "main"),
    "rag": ("rag.cli", "main"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def serve_parser(
    prog: str = "loraplex serve", description: str = "Start the OpenAI-compatible multi-adapter server."
) -> argparse.ArgumentParser:
    """``loraplex serve`` flags, generated from :class:`Settings` so the two never drift apart."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description + " Every flag is also an environment "
        "variable: --max-loaded-adapters N is LORAPLEX_MAX_LOADED_ADAPTERS=N; flags win over it, and "
        "both win over --config.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (snake_case keys)")
    for name, field in Settings.model_fields.items():
        env = "LORAPLEX_" + name.upper()
        help_text = f"{field.description} (env {env}; default: {field.default})"
        if field.annotation is bool:
            parser.add_argument(
                _flag(name), dest=name, action="store_const", const=True, default=None, help=help_text
            )
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if "repeatable_flag" in extra:  # a mapping or list setting: the singular flag, once per entry
            parser.add_argument(
                str(extra["repeatable_flag"]),
                _flag(name),
                dest=name,
                action="append",
                default=None,
                metavar="ENTRY",
                help=help_text,
            )
            continue
        choices = get_args(field.annotation) if "Literal" in str(field.annotation) else None
        parser.add_argument(
            _flag(name),
            dest=name,
            default=None,
            choices=choices or None,
            metavar=None if choices else name.upper(),
            help=help_text,
        )
    return parser


def load_settings(argv: list[str]) -> Settings:
    """Settings from flags > ``LORAPLEX_*`` environment > config file > defaults; fails naming the setting."""
    return settings_from_args(vars(serve_parser().parse_args(argv)))


def settings_from_args(args: dict) -> Settings:
    """:func:`load_settings` for flags already parsed by (a parser built on) :func:`serve_parser`."""
    args = dict(args)
    config_file = args.pop("config")
    values: dict = {}
    if config_file:
        try:
            text = Path(config_file).read_text()
            loaded = json.loads(text) if config_file.endswith(".json") else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise SystemExit(f"loraplex serve: cannot read --config {config_file}: {e}") from None
        if not isinstance(loaded, dict):
            raise SystemExit(f"loraplex serve: --config {config_file} must hold a mapping of settings")
        unknown = sorted(set(loaded) - set(Settings.model_fields))
        if unknown:
            raise SystemExit(f"loraplex serve: unknown settings in --config: {', '.join(unknown)}")
        values = {k: v for k, v in loaded.items() if "LORAPLEX_" + k.upper() not in os.environ}
    values.update({k: v for k, v in args.items() if v is not None})
    try:
        return Settings(**values)
    except ValidationError as e:
        problems = "; ".join(
            f"{_flag(str(err['loc'][0])) if err['loc'] else 'settings'}: {err['msg']}" for err in e.errors()
        )
        raise SystemExit(f"loraplex serve: invalid settings: {problems}") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_exposure(settings: Settings, log: logging.Logger) -> None:
    if settings.api_keys_file is None:
        if not _is_loopback(settings.host) and not settings.allow_unauthenticated:
            raise SystemExit(
                f"loraplex serve: refusing to bind {settings.host} without API keys; give --api-keys-file, "
                "or --allow-unauthenticated if the network is trusted"
            )
        log.warning("no API keys configured: every caller is an admin (fine on loopback, not beyond)")


def serve(argv: list[str]) -> int:
    import uvicorn

    from server.app import create_app
    from server.logs import configure_logging

    settings = load_settings(argv)
    configure_logging(settings.log_level, settings.log_json)
    _check_exposure(settings, logging.getLogger("loraplex"))
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    fatal = threading.Event()

    def on_fatal() -> None:
        fatal.set()
        os.kill(os.getpid(), signal.SIGTERM)  # graceful stop; the exit code below says it failed

    try:
        app = create_app(settings, on_fatal=on_fatal)
    except ValueError as e:  # e.g. an invalid keys file
        raise SystemExit(f"loraplex serve: {e}") from None
    # uvicorn re-raises a captured SIGTERM after its graceful shutdown, with the handler that was in
    # place before it started; a no-op handler there makes a drained SIGTERM exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        h11_max_incomplete_event_size=64 * 1024,
    )
    return 1 if fatal.is_set() else 0


_RAY_FLAGS = ("replicas", "cpus_per_replica", "gpus_per_replica", "address")


def ray_serve_parser() -> argparse.ArgumentParser:
    """``loraplex ray serve``: every ``loraplex serve`` flag plus where and how wide to run."""
    parser = serve_parser(
        "loraplex ray serve",
        "Serve the same API on Ray Serve: N engine replicas behind one HTTP port, requests for an "
        "adapter routed to a replica that has it loaded (--max-loaded-adapters per replica).",
    )
    group = parser.add_argument_group("Ray")
    group.add_argument("--replicas", type=int, default=1, help="engine replicas (default: 1)")
    group.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs per replica")
    group.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray GPUs per replica")
    group.add_argument(
        "--address", default=None, help="Ray cluster (ray://HOST:10001 or auto); default: a local instance"
    )
    return parser


def ray_command(argv: list[str]) -> int:
    """``loraplex ray serve ...``."""
    if not argv or argv[0] != "serve":
        print("usage: loraplex ray serve [flags]  (loraplex ray serve --help)", file=sys.stderr)
        return 2
    from server.logs import configure_logging

    args = vars(ray_serve_parser().parse_args(argv[1:]))
    ray_args = {name: args.pop(name) for name in _RAY_FLAGS}
    settings = settings_from_args(args)
    try:
        from server.ray.app import RayOptions
        from server.ray.launch import serve_until_signalled

        options = RayOptions(**ray_args)
    except ValueError as e:
        raise SystemExit(f"loraplex ray serve: {e}") from None
    try:
        import ray  # noqa: F401 - only to fail early and clearly
    except ImportError:
        raise SystemExit("loraplex ray serve: Ray is not installed; pip install 'loraplex[ray]'") from None
    configure_logging(settings.log_level, settings.log_json)
    _check_exposure(settings, logging.getLogger("loraplex"))
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    return serve_until_signalled(settings, options)


def export(argv: list[str]) -> int:
    """``loraplex export``: fold a stored adapter into the base and write a standalone HF model."""
    import torch

    from adapters.base_model import resolve_base_model
    from adapters.export import export_merged_model
    from adapters.store import AdapterStore

    parser = argparse.ArgumentParser(
        prog="loraplex export",
        description="Fold adapter NAME into the base model's weights and write a standalone HF model "
        "(loadable by transformers.AutoModelForCausalLM.from_pretrained(DIR)). Base model, quantization "
        "and adapter store come from the same settings as `loraplex serve` (flags below or LORAPLEX_*).",
    )
    parser.add_argument("--adapter", required=True, help="adapter name in the store")
    parser.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    for name in ("base_model", "quantization", "data_dir", "adapter_dir", "cache_dir"):
        parser.add_argument(
            _flag(name), dest=name, default=None, help=Settings.model_fields[name].description
        )
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    settings = Settings(**given)
    logging.basicConfig(level="INFO", format="%(levelname)s %(message)s")
    folder = AdapterStore(settings.adapter_dir).require(args.adapter)
    report = export_merged_model(
        resolve_base_model(settings.base_model, settings.cache_dir),
        folder,
        args.out,
        dtype=getattr(torch, args.dtype),
        quantization=settings.quantization,
        adapter_name=args.adapter,
        overwrite=args.overwrite,
    )
    print(json.dumps(report.to_dict(), indent=2, default=str))
    return 0


def evaluate(argv: list[str]) -> int:
    """``loraplex eval``: in-process through the serving engine, or against ``--server URL``."""
    from training import eval_cli

    ns = eval_cli.build_parser().parse_args(argv)
    if ns.server:
        return eval_cli.main(argv)
    from server.offline import InProcessGenerator

    given = {
        "base_model": ns.base_model,
        "quantization": ns.quantization,
        "device": ns.device,
        "adapter_dir": ns.adapter_dir,
    }
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    with InProcessGenerator(settings) as generate:
        return eval_cli.main(argv, generate=generate)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ["serve", "ray", "export", "eval", *_DELEGATED]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: loraplex {" + ",".join(commands) + "} ...\n")
        print("  serve   start the server (loraplex serve --help)")
        print("  ray     ray serve: the same server scaled out on Ray Serve (loraplex ray serve --help)")
        print("  train   train a LoRA adapter from a JSONL dataset into the adapter store")
        print("  eval    score the base model and an adapter on a JSONL test set")
        print("  rag     ingest, search and evaluate RAG collections")
        print("  export  fold an adapter into the base and write a standalone HF model")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "ray":
        return ray_command(rest)
    if command == "export":
        return export(rest)
    if command == "eval":
        return evaluate(rest)
    if command in _DELEGATED:
        module_name, func = _DELEGATED[command]
        module = importlib.import_module(module_name)
        return int(getattr(module, func)(rest) or 0)
    print(f"loraplex: unknown command {command!r}; choose from {', '.join(commands)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
