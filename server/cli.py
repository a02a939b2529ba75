"""The ``loraplex`` command: dispatches to the packages; holds no logic of its own."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from server.config import Settings

# Subcommands implemented by other packages: name -> (module, function taking argv).
_DELEGATED = {
    "train": ("training.cli", "main"),
    "eval": ("training.eval_cli", "main"),
    "rag": ("rag.cli", "main"),
    "export": ("adapters.export_cli", "main"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def serve_parser() -> argparse.ArgumentParser:
    """``loraplex serve`` flags, generated from :class:`Settings` so the two never drift apart."""
    parser = argparse.ArgumentParser(
        prog="loraplex serve",
        description="Start the OpenAI-compatible multi-adapter server. Every flag is also an environment "
        "variable: --max-loaded-adapters N is LORAPLEX_MAX_LOADED_ADAPTERS=N; flags win over it.",
    )
    for name, field in Settings.model_fields.items():
        choices = get_args(field.annotation) if "Literal" in str(field.annotation) else None
        default = field.default
        env = "LORAPLEX_" + name.upper()
        parser.add_argument(
            _flag(name),
            dest=name,
            default=None,
            choices=choices or None,
            metavar=None if choices else name.upper(),
            help=f"{field.description} (env {env}; default: {default})",
        )
    return parser


def load_settings(argv: list[str]) -> Settings:
    args = serve_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        problems = "; ".join(
            f"{_flag(str(err['loc'][0])) if err['loc'] else 'settings'}: {err['msg']}" for err in e.errors()
        )
        raise SystemExit(f"loraplex serve: invalid settings: {problems}") from None


def serve(argv: list[str]) -> int:
    import uvicorn

    from server.app import create_app

    settings = load_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ["serve", *_DELEGATED]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: loraplex {" + ",".join(commands) + "} ...\n")
        print("  serve   start the server (loraplex serve --help)")
        print("  train   train a LoRA adapter from a JSONL dataset into the adapter store")
        print("  eval    score the base model and an adapter on a JSONL test set")
        print("  rag     ingest, search and evaluate RAG collections")
        print("  export  fold an adapter into the base and write a standalone HF model")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command in _DELEGATED:
        module_name, func = _DELEGATED[command]
        module = importlib.import_module(module_name)
        return int(getattr(module, func)(rest) or 0)
    print(f"loraplex: unknown command {command!r}; choose from {', '.join(commands)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
