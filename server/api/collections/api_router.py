"""``/v1/rag/...``: collections, documents and search. Thin: parse, call ``rag``, return.

The manager is ``request.app.state.rag`` (a :class:`server.api.collections.rag_service.RagService`: the
app's own collections, or under Ray Serve the RAG deployment's). Blocking work runs in the thread pool;
errors are the ``rag.errors`` exceptions, mapped to HTTP by ``server/api/errors.py``.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from adapters.safe_files import JSONTooDeep, loads_bounded
from rag.errors import CollectionNotFound, DocumentTooLarge
from rag.extract import UploadedFile
from server.api.auth import Admin, Caller, Principal
from server.api.collections.protocol import (
    CollectionDeleted,
    CollectionList,
    CollectionObject,
    CreateCollectionRequest,
    DocumentDeleted,
    DocumentList,
    DocumentObject,
    IngestedDocument,
    IngestResponse,
    IngestTextRequest,
    SearchRequest,
    SearchResponse,
    SearchResult,
)
from server.api.collections.rag_service import RagService
from server.api.errors import APIError

MAX_METADATA_DEPTH = 16  # nesting of a multipart upload's metadata JSON

router = APIRouter(prefix="/v1/rag", tags=["rag"])

_INGEST_BODY = {
    "requestBody": {
        "content": {
            "application/json": {"schema": IngestTextRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "metadata": {"type": "string", "description": "a JSON object given to every file"},
                    },
                    "required": ["files"],
                }
            },
        },
        "required": True,
    }
}


def get_manager(request: Request) -> RagService:
    return request.app.state.rag


def check_visible(caller: Principal, name: str) -> None:
    """Outside the caller's allow-list a collection does not exist (the same 404 as a missing one)."""
    if not caller.may_use_collection(name):
        raise CollectionNotFound(name)


def check_writable(caller: Principal, name: str) -> None:
    """Document writes need an admin key or a user key granted write on the collection."""
    check_visible(caller, name)
    if not caller.may_write_collection(name):
        raise APIError(403, "This key may read but not change this collection.", code="permission_denied")


Manager = Annotated[RagService, Depends(get_manager)]


@router.post("/collections", response_model=CollectionObject)
async def create_collection(body: CreateCollectionRequest, manager: Manager, _: Admin) -> CollectionObject:
    info = await run_in_threadpool(
        manager.create,
        body.name,
        embedding_model=body.embedding_model,
        chunk_size=body.chunk_size,
        chunk_overlap=body.chunk_overlap,
        index=body.index,
        hnsw_m=body.hnsw_m,
        hnsw_ef_construction=body.hnsw_ef_construction,
        hnsw_ef_search=body.hnsw_ef_search,
    )
    return CollectionObject.from_info(info)


@router.get("/collections", response_model=CollectionList)
async def list_collections(manager: Manager, caller: Caller) -> CollectionList:
    infos = await run_in_threadpool(manager.list_collections)
    visible = [i for i in infos if caller.may_use_collection(i.name)]
    return CollectionList(data=[CollectionObject.from_info(i) for i in visible])


@router.get("/collections/{name}", response_model=CollectionObject)
async def get_collection(name: str, manager: Manager, caller: Caller) -> CollectionObject:
    check_visible(caller, name)
    return CollectionObject.from_info(await run_in_threadpool(manager.info, name))


@router.delete("/collections/{name}", response_model=CollectionDeleted)
async def delete_collection(name: str, manager: Manager, _: Admin) -> CollectionDeleted:
    await run_in_threadpool(manager.delete, name)
    return CollectionDeleted(name=name)


@router.post("/collections/{name}/documents", response_model=IngestResponse, openapi_extra=_INGEST_BODY)
async def add_documents(name: str, request: Request, manager: Manager, caller: Caller) -> IngestResponse:
    check_writable(caller, name)
    """JSON (``{"documents": [{"text", "source"?, "id"?, "metadata"?}]}`` or one document's fields) or
    multipart (``files`` parts, optional ``metadata`` JSON part)."""
    await run_in_threadpool(manager.check_exists, name)  # 404 before reading a large body
    content_length = int(request.headers.get("content-length") or 0)
    if content_length > manager.max_upload_bytes:
        raise DocumentTooLarge("request body", content_length, manager.max_upload_bytes)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        files, metadata = await _read_multipart(request, manager.max_upload_bytes)
        results = await run_in_threadpool(manager.ingest_files, name, files, metadata)
    else:
        body = _parse_json(IngestTextRequest, await request.body())
        results = await run_in_threadpool(manager.ingest, name, body.to_inputs())
    return IngestResponse(data=[IngestedDocument.from_result(r) for r in results])


@router.get("/collections/{name}/documents", response_model=DocumentList)
async def list_documents(
    name: str,
    manager: Manager,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DocumentList:
    check_visible(caller, name)
    records = await run_in_threadpool(manager.list_documents, name, limit, offset)
    return DocumentList(data=[DocumentObject.from_record(r) for r in records])


@router.delete("/collections/{name}/documents/{document_id:path}", response_model=DocumentDeleted)
async def delete_document(name: str, document_id: str, manager: Manager, caller: Caller) -> DocumentDeleted:
    check_writable(caller, name)
    await run_in_threadpool(manager.delete_document, name, document_id)
    return DocumentDeleted(id=document_id)


@router.post("/collections/{name}/search", response_model=SearchResponse)
async def search(name: str, body: SearchRequest, manager: Manager, caller: Caller) -> SearchResponse:
    check_visible(caller, name)
    passages = await run_in_threadpool(manager.retrieve, name, body.query, body.top_k, body.mode, body.filter)
    return SearchResponse(mode=body.mode, data=[SearchResult.from_passage(p) for p in passages])


def _parse_json(model: type[IngestTextRequest], raw: bytes) -> IngestTextRequest:
    """Validates a JSON body the way FastAPI would, so errors get the usual 400 shape."""
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from e


async def _read_multipart(request: Request, max_bytes: int) -> tuple[list[UploadedFile], dict]:
    form = await request.form()
    try:
        uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not uploads:
            raise RequestValidationError(
                [{"type": "missing", "loc": ("files",), "msg": "at least one file part is required"}]
            )
        files = []
        for upload in uploads:
            data = await upload.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise DocumentTooLarge(upload.filename or "file", upload.size or len(data), max_bytes)
            files.append(UploadedFile(upload.filename or "upload", data, upload.content_type))
        return files, _form_metadata(form.get("metadata"))
    finally:
        await form.close()


def _form_metadata(raw: object) -> dict:
    if raw is None:
        return {}
    try:
        metadata = loads_bounded(str(raw), MAX_METADATA_DEPTH)
    except JSONTooDeep as e:
        raise APIError(400, f"metadata: {e}", code="invalid_request", param="metadata") from e
    except (json.JSONDecodeError, RecursionError):
        metadata = None
    if not isinstance(metadata, dict):
        raise RequestValidationError(
            [{"type": "json_object", "loc": ("metadata",), "msg": "must be a JSON object", "input": raw}]
        )
    return metadata
