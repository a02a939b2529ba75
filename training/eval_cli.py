"""``loraplex eval``: exact match, contains-match and token F1 for the base model and an adapter.

Generation goes through one of three paths: a ``generate`` callable handed in by the caller (the
server's CLI passes its in-process engine), a running server (``--server URL``), or, by default,
an offline PEFT model on the same base (greedy, same chat template and encoding as the server).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from adapters.base_model import QUANTIZATIONS, BaseModelError
from adapters.errors import AdapterNotFound
from training.cli import default_adapter_dir
from training.data import DatasetError, read_dataset
from training.evaluate import (
    GenerateFn,
    HTTPGenerator,
    PeftGreedyGenerator,
    ServerError,
    compare,
    examples_from,
    format_report,
)


def build_parser(prog: str = "loraplex eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Score greedy replies against the reference assistant turns of a JSONL file, "
        "for the base model and an adapter side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="JSONL; each row's last assistant turn is the reference"
    )
    parser.add_argument("--adapter", help="adapter name (default: the base model only)")
    parser.add_argument("--no-base", action="store_true", help="skip the base model run")
    parser.add_argument(
        "--server", metavar="URL", help="generate through a running server instead of in-process"
    )
    parser.add_argument("--api-key", help="API key for --server")
    parser.add_argument(
        "--adapter-dir", type=Path, help="adapter store for offline generation (default: as the server)"
    )
    parser.add_argument(
        "--base-model", help="HF directory or .gguf (offline generation; default: the server's)"
    )
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="nf4")
    parser.add_argument("--device", help="cpu, cuda … (offline generation)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per reply")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="evaluate only the first N rows")
    parser.add_argument("--samples", type=int, default=3, help="sample outputs to show")
    parser.add_argument("--json-out", type=Path, help="also write scores and predictions as JSON")
    return parser


def offline_generator(ns: argparse.Namespace) -> GenerateFn:
    from adapters.base_model import load_base_model, resolve_base_model
    from adapters.store import AdapterStore

    base = load_base_model(resolve_base_model(ns.base_model), quantization=ns.quantization, device=ns.device)
    store = AdapterStore(ns.adapter_dir or default_adapter_dir())
    return PeftGreedyGenerator(base, store.require)


def main(argv: list[str] | None = None, generate: GenerateFn | None = None) -> int:
    """Runs ``loraplex eval``; ``generate`` (optional) replaces the built-in generation paths."""
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        examples = examples_from(read_dataset(ns.data), ns.limit)
        if generate is None:
            generate = HTTPGenerator(ns.server, ns.api_key) if ns.server else offline_generator(ns)
        comparison = compare(
            examples, generate, ns.adapter, ns.max_tokens, ns.batch_size, include_base=not ns.no_base
        )
    except (DatasetError, AdapterNotFound, BaseModelError, ServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(comparison, samples=ns.samples))
    if ns.json_out:
        ns.json_out.write_text(
            json.dumps(
                {
                    "data": str(ns.data),
                    "runs": [
                        {
                            "adapter": run.adapter,
                            "scores": run.scores.as_dict(),
                            "predictions": run.predictions,
                        }
                        for run in comparison.runs
                    ],
                    "references": [e.reference for e in comparison.examples],
                },
                indent=2,
            )
        )
    return 0
