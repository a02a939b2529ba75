"""The Ray Serve application: one ingress in front of N engine replicas (multiplexed by adapter),
which all reach the RAG collections through one RAG deployment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.config import Settings
from server.ray.ingress import Ingress
from server.ray.rag_replica import RAG_DEPLOYMENT, RagReplica
from server.ray.replica import EngineReplica

APP_NAME = "loraplex"
RAG_MAX_ONGOING_REQUESTS = 64  # searches and writes from every engine replica at once


@dataclass(frozen=True)
class RayOptions:
    """How the engine is spread over the Ray cluster (``loraplex ray serve`` flags)."""

    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    address: str | None = None  # None: start a local Ray instance

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if self.cpus_per_replica <= 0:
            raise ValueError(f"--cpus-per-replica must be positive, got {self.cpus_per_replica}")
        if self.gpus_per_replica < 0:
            raise ValueError(f"--gpus-per-replica must be at least 0, got {self.gpus_per_replica}")


def build_application(settings: Settings, options: RayOptions) -> Any:
    """The bound Ray Serve application (``serve.run`` it)."""
    from ray import serve

    class EngineReplicaDeployment(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=settings.max_loaded_adapters)
        async def adapter(self, model_id: str):
            return await self.load_adapter(model_id)

    grace = settings.shutdown_grace_seconds
    engine = serve.deployment(
        name="EngineReplica",
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
        # Admission is the engine's (max_pending → 429); Ray only must not queue in front of it.
        max_ongoing_requests=settings.max_pending,
        graceful_shutdown_timeout_s=grace,
        health_check_period_s=5.0,
    )(EngineReplicaDeployment)
    ingress = serve.deployment(
        name="Ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,
        graceful_shutdown_timeout_s=grace,
    )(Ingress)
    rag = serve.deployment(
        name=RAG_DEPLOYMENT,
        num_replicas=1,  # the one writer of every collection's index
        # No CPUs reserved: it embeds only on ingest and search, and fits beside the engine replicas
        # (also on a KubeRay head with num-cpus 0).
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=RAG_MAX_ONGOING_REQUESTS,
        graceful_shutdown_timeout_s=grace,
    )(RagReplica)
    engine_replicas = engine.bind(settings, options.cpus_per_replica, rag.bind(settings))
    return ingress.bind(engine_replicas, settings, APP_NAME, options.replicas)


def options_and_settings(args: dict[str, Any]) -> tuple[Settings, RayOptions]:
    """Splits a Ray Serve config's ``args`` (snake_case ``loraplex serve`` settings plus ``replicas``,
    ``cpus_per_replica``, ``gpus_per_replica``) into the two objects; unknown keys fail, naming them."""
    args = dict(args)
    ray_fields = {k: args.pop(k) for k in ("replicas", "cpus_per_replica", "gpus_per_replica") if k in args}
    unknown = sorted(set(args) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"unknown loraplex settings in the Serve config's args: {', '.join(unknown)}")
    return Settings(**args), RayOptions(**ray_fields)


def app_builder(args: dict[str, Any]) -> Any:
    """The application for a Ray Serve config file (``import_path: server.ray.app:app_builder``), as
    KubeRay's RayService deploys it; ``args`` as for :func:`options_and_settings`."""
    settings, options = options_and_settings(args)
    return build_application(settings, options)
