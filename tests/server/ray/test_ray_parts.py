"""The parts of ``loraplex ray serve`` that need no Ray instance: routing, the ASGI bridge, the
placement gate, the CLI, the KubeRay manifest, and importing every module without Ray."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from adapters.merging import MergeSpec, merged_name
from adapters.store import AdapterStore
from server.cli import ray_serve_parser, settings_from_args
from server.config import Settings
from server.ray.app import RayOptions, options_and_settings
from server.ray.asgi_bridge import ForwardedRequest, ResponseStart, call_app
from server.ray.placement import PlacementGate
from server.ray.routing import AdminAction, admin_action, multiplexed_model_id

REPO = Path(__file__).resolve().parents[3]
MERGE = {"merge": [{"name": "b", "weight": 1.0}, {"name": "a", "weight": 0.5}], "method": "linear"}


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    return AdapterStore(tmp_path)


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [
        ("POST", "/v1/chat/completions", {"model": "a"}, "a"),
        ("POST", "/v1/chat/completions", {"model": "base-model"}, ""),  # not an adapter: balanced
        ("POST", "/v1/chat/completions", {"model": "base-model", "adapter": "b"}, "b"),
        ("POST", "/v1/completions", {"model": "missing"}, ""),  # any replica answers the 404
        ("POST", "/v1/completions", {"adapter": "merge-0123456789ab"}, "merge-0123456789ab"),
        ("POST", "/v1/chat/completions", {"adapter": MERGE}, merged_name(MergeSpec.from_request(MERGE))),
        ("POST", "/v1/chat/completions", {"adapter": {"merge": "bad"}}, ""),  # the replica's 400
        ("POST", "/v1/responses", {"model": "b"}, "b"),
        ("POST", "/generate", {"inputs": "x", "parameters": {"adapter_id": "a"}}, "a"),
        ("POST", "/generate_stream", {"inputs": "x", "parameters": {}}, ""),
        ("POST", "/v1/embeddings", {"model": "a"}, ""),  # not a generating route
        ("GET", "/v1/models", None, ""),
        ("POST", "/v1/adapters/a/load", None, "a"),  # loaded where its requests will go
        ("POST", "/v1/load_lora_adapter", {"lora_name": "b"}, "b"),
        ("DELETE", "/v1/adapters/a", None, ""),  # store changes: any replica, then broadcast
        ("POST", "/v1/chat/completions", b"not json", ""),
    ],
)
def test_multiplexed_model_id(store, method, path, body, expected):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    assert multiplexed_model_id(method, path, raw, store, max_merge_parts=8) == expected


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [
        ("PUT", "/v1/adapters/x", b"", AdminAction("x", "forget")),
        ("DELETE", "/v1/adapters/x", b"", AdminAction("x", "forget")),
        ("POST", "/v1/adapters/x/save", b"{}", AdminAction("x", "forget")),
        ("POST", "/v1/adapters/x/unload", b"", AdminAction("x", "unload")),
        ("POST", "/v1/adapters/x/load", b"", AdminAction("x", None)),
        ("POST", "/v1/unload_lora_adapter", b'{"lora_name": "x"}', AdminAction("x", "unload")),
        ("POST", "/v1/load_lora_adapter", b'{"lora_name": "x"}', AdminAction("x", None)),
        ("GET", "/v1/adapters", b"", None),
        ("GET", "/v1/adapters/x", b"", None),
        ("POST", "/v1/chat/completions", b"{}", None),
    ],
)
def test_admin_action(method, path, body, expected):
    assert admin_action(method, path, body) == expected


def streaming_app(seen: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"body": (await request.body()).decode(), "query": request.url.query}

    @app.get("/stream")
    async def stream(request: Request) -> StreamingResponse:
        async def events():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
                seen.append("finished")
            finally:
                seen.append("disconnected" if await request.is_disconnected() else "closed")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_bridge_passes_body_query_status_and_extra_headers():
    async def run():
        request = ForwardedRequest("POST", "/echo", b"x=1", ((b"content-type", b"text/plain"),), b"hello")
        return [item async for item in call_app(streaming_app([]), request, ((b"x-extra", b"1"),))]

    start, *chunks = asyncio.run(run())
    assert isinstance(start, ResponseStart) and start.status == 200
    assert (b"x-extra", b"1") in start.headers
    assert json.loads(b"".join(chunks)) == {"body": "hello", "query": "x=1"}


def test_bridge_closed_early_stops_the_stream_as_a_disconnect():
    seen: list[str] = []

    async def run():
        items = call_app(streaming_app(seen), ForwardedRequest("GET", "/stream"))
        start = await items.__anext__()
        first = await items.__anext__()
        await items.aclose()  # the client went away
        return start, first

    start, first = asyncio.run(run())
    assert start.status == 200 and first == b"data: 0\n\n"
    assert seen and "finished" not in seen  # stopped long before its 1000 events


def test_placement_gate_holds_an_ids_later_requests_until_the_first_is_answered():
    order: list[str] = []

    async def send(gate: PlacementGate, name: str, model_id: str, seconds: float):
        async with gate.first_of(None, model_id):
            order.append(f"{name} sent")
            await asyncio.sleep(seconds)
            order.append(f"{name} answered")

    async def run():
        gate = PlacementGate(settle_seconds=0.5)
        first = asyncio.create_task(send(gate, "first", "a", 0.2))
        await asyncio.sleep(0)
        await asyncio.gather(first, send(gate, "second", "a", 0.0), send(gate, "other", "b", 0.0))

    asyncio.run(run())
    assert order.index("second sent") > order.index("first answered")
    assert order.index("other sent") < order.index("first answered")  # other ids are not held


def test_ray_serve_flags_are_the_serve_settings_plus_the_ray_ones():
    parser = ray_serve_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    assert {"--" + name.replace("_", "-") for name in Settings.model_fields} <= flags
    assert {"--replicas", "--cpus-per-replica", "--gpus-per-replica", "--address"} <= flags
    args = vars(parser.parse_args(["--replicas", "3", "--max-loaded-adapters", "5", "--address", "auto"]))
    assert (args.pop("replicas"), args.pop("address")) == (3, "auto")
    for name in ("cpus_per_replica", "gpus_per_replica"):
        args.pop(name)
    assert settings_from_args(args).max_loaded_adapters == 5


@pytest.mark.parametrize(
    ("argv", "named"),
    [(["--replicas", "0"], "--replicas"), (["--cpus-per-replica", "0"], "--cpus-per-replica")],
)
def test_invalid_ray_flags_fail_naming_the_flag(argv, named):
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "ray", "serve", *argv], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode != 0 and named in result.stderr


def test_kuberay_manifest_is_a_rayservice_whose_serve_config_builds():
    manifest = yaml.safe_load((REPO / "server/ray/kuberay-rayservice.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    [app] = serve_config["applications"]
    module, _, function = app["import_path"].partition(":")
    assert (module, function) == ("server.ray.app", "app_builder")
    settings, options = options_and_settings(app["args"])
    assert options == RayOptions(replicas=2, cpus_per_replica=4, gpus_per_replica=1)
    assert str(settings.data_dir) == "/data" and settings.max_loaded_adapters == 16
    worker = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["volumeMounts"][0]["mountPath"] == "/data"  # the shared store
    with pytest.raises(ValueError, match="replica"):
        options_and_settings({**app["args"], "replica": 2})


def test_every_ray_module_imports_without_ray():
    modules = sorted(p.stem for p in (REPO / "server/ray").glob("*.py") if p.stem != "__init__")
    code = "import sys; sys.modules['ray'] = None\n" + "".join(f"import server.ray.{m}\n" for m in modules)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
