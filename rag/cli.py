"""``loraplex rag …``: ingest files into a collection, search it, and evaluate retrieval on a QA set.

Collections live under ``DATA_DIR/rag``; ``DATA_DIR`` is ``--data-dir``, else ``$LORAPLEX_DATA_DIR``, else
``./data``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from adapters.shared_settings import SharedSettings
from rag.chunker import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_SIZE
from rag.collection import DocumentInput, IngestResult
from rag.collections import CollectionManager
from rag.errors import CollectionNotFound, CollectionsInUse
from rag.evaluate import evaluate, format_table, load_qa
from rag.extract import SUPPORTED_SUFFIXES, extract_text
from rag.index import INDEX_KINDS
from rag.retriever import DEFAULT_MODE, SEARCH_MODES

INGEST_BATCH_FILES = 4  # files per ingest call: one index write each


def data_dir(arg: str | None) -> Path:
    return Path(arg) if arg else SharedSettings().data_dir


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="data directory (default: $LORAPLEX_DATA_DIR or ./data)")
    common.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser = argparse.ArgumentParser(prog="loraplex rag", description="Document collections for RAG.")
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser(
        "ingest", parents=[common], help="add files to a collection (created if new)"
    )
    ingest.add_argument("collection")
    ingest.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or directories")
    ingest.add_argument("--glob", help="file pattern inside directories (default: all supported types)")
    ingest.add_argument("--embedding-model", help="a local sentence-transformers directory (new collections)")
    ingest.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="tokens (new collections)")
    ingest.add_argument(
        "--chunk-overlap", type=int, default=DEFAULT_CHUNK_OVERLAP, help="tokens (new collections)"
    )
    ingest.add_argument("--index", choices=INDEX_KINDS, default="flat", help="vector index (new collections)")

    search = commands.add_parser("search", parents=[common], help="search a collection")
    search.add_argument("collection")
    search.add_argument("query")
    search.add_argument("--mode", choices=SEARCH_MODES, default=DEFAULT_MODE)
    search.add_argument("--top-k", type=int, default=5)

    evaluate_ = commands.add_parser("eval", parents=[common], help="recall@k and MRR on a QA set")
    evaluate_.add_argument("collection")
    evaluate_.add_argument("--data", type=Path, required=True, help='JSONL rows {"question", "expected"}')
    evaluate_.add_argument("--modes", nargs="+", choices=SEARCH_MODES, default=list(SEARCH_MODES))

    commands.add_parser("list", parents=[common], help="list collections")
    delete = commands.add_parser("delete", parents=[common], help="delete a collection")
    delete.add_argument("collection")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``loraplex rag`` with ``argv`` (the arguments after "rag"); returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        manager = CollectionManager(data_dir(args.data_dir) / "rag")
    except CollectionsInUse as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _COMMANDS[args.command](manager, args)
    except (LookupError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        manager.close()


def _files(paths: list[Path], pattern: str | None) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for file in sorted(path.rglob(pattern or "*")):
                if file.is_file() and (pattern or file.suffix.lower() in SUPPORTED_SUFFIXES):
                    yield file
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")


def _ingest(manager: CollectionManager, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    try:
        manager.get(args.collection)
    except CollectionNotFound:
        manager.create(
            args.collection,
            embedding_model=args.embedding_model,
            chunk_size=args.chunk_size,
            chunk_overlap=args.chunk_overlap,
            index=args.index,
        )
        print(f"created collection {args.collection}")
    try:
        files = list(_files(args.paths, args.glob))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    failures = 0
    results: list[IngestResult] = []
    batch: list[DocumentInput] = []
    with tqdm(total=len(files), unit="file", desc=f"ingest {args.collection}") as progress:
        for file in files:
            try:
                text = extract_text(file.read_bytes(), file.name)
                batch.append(DocumentInput(text, source=str(file)))
            except (OSError, ValueError) as e:
                failures += 1
                progress.write(f"skipped {file}: {e}")
                progress.update(1)
            if len(batch) >= INGEST_BATCH_FILES:
                results += _ingest_batch(manager, args.collection, batch, progress)
                progress.update(len(batch))
                batch = []
        results += _ingest_batch(manager, args.collection, batch, progress)
        progress.update(len(batch))
    counts = {
        status: sum(r.status == status for r in results) for status in ("created", "replaced", "unchanged")
    }
    chunks = sum(r.chunk_count for r in results if r.status != "unchanged")
    print(", ".join(f"{n} {status}" for status, n in counts.items()) + f"; {chunks} chunks embedded")
    return 1 if failures else 0


def _ingest_batch(
    manager: CollectionManager, name: str, batch: list[DocumentInput], progress
) -> list[IngestResult]:
    if not batch:
        return []
    try:
        return manager.ingest(name, batch)
    except ValueError:
        # One bad document fails its batch; ingest one by one to keep the good ones.
        results = []
        for document in batch:
            try:
                results += manager.ingest(name, [document])
            except ValueError as e:
                progress.write(f"skipped {document.source}: {e}")
        return results


def _search(manager: CollectionManager, args: argparse.Namespace) -> int:
    passages = manager.retrieve(args.collection, args.query, args.top_k, args.mode)
    for rank, p in enumerate(passages, start=1):
        text = " ".join(p.text.split())
        print(
            f"{rank:>2}. score {p.score:.4f}  {p.source} [{p.start_char}:{p.end_char}] (chunk {p.chunk_id})"
        )
        print(f"    {text[:300]}{'…' if len(text) > 300 else ''}")
    if not passages:
        print("no results")
    return 0


def _eval(manager: CollectionManager, args: argparse.Namespace) -> int:
    collection = manager.get(args.collection)
    items = load_qa(args.data)
    scores = evaluate(collection.search, items, tuple(args.modes))
    print(f"{len(items)} questions, collection {args.collection}\n")
    print(format_table(scores))
    return 0


def _list(manager: CollectionManager, args: argparse.Namespace) -> int:
    for info in manager.list_collections():
        print(
            f"{info.name}: {info.document_count} documents, {info.chunk_count} chunks, "
            f"{info.settings.embedding_model}, index {info.settings.index.kind}"
        )
    return 0


def _delete(manager: CollectionManager, args: argparse.Namespace) -> int:
    manager.delete(args.collection)
    print(f"deleted collection {args.collection}")
    return 0


_COMMANDS = {"ingest": _ingest, "search": _search, "eval": _eval, "list": _list, "delete": _delete}

if __name__ == "__main__":
    sys.exit(main())
