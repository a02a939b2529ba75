"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])

WEDGED_AFTER_SECONDS = 30.0


@router.get("/health")
def health() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/ready")
def ready(request: Request) -> JSONResponse:
    """The model is loaded and the engine loop is alive and stepping."""
    state = getattr(request.app.state, "serving", None)
    if state is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    engine = state.engine.health()
    body = {"status": "ready", "running": engine.running, "waiting": engine.waiting}
    if not engine.alive:
        return JSONResponse({**body, "status": "engine_dead"}, status_code=503)
    if engine.seconds_since_step > WEDGED_AFTER_SECONDS:
        return JSONResponse({**body, "status": "engine_wedged"}, status_code=503)
    return JSONResponse(body)
