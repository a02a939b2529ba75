"""Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Every metric the server exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraplex_requests", "HTTP requests", ["route", "status", "adapter"], registry=r
        )
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("loraplex_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "loraplex_inter_token_latency_seconds",
            "time between streamed updates",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter("loraplex_rejected_requests", "requests refused", ["reason"], registry=r)
        self.queue_depth = Gauge("loraplex_queue_depth", "sequences waiting to join the batch", registry=r)
        self.running = Gauge("loraplex_running_batch_size", "sequences in the running batch", registry=r)
        self.resident_adapters = Gauge("loraplex_resident_adapters", "adapters in model memory", registry=r)
        self.adapter_loads = Gauge("loraplex_adapter_loads", "adapter loads since start", registry=r)
        self.adapter_evictions = Gauge(
            "loraplex_adapter_evictions", "adapter evictions since start", registry=r
        )
        self.adapter_load_seconds = Gauge(
            "loraplex_adapter_last_load_seconds", "duration of the last adapter load", registry=r
        )
        self.engine_seconds = Gauge(
            "loraplex_engine_forward_seconds", "engine time in forward passes", ["phase"], registry=r
        )
        self.engine_steps = Gauge("loraplex_engine_decode_steps", "decode steps since start", registry=r)
        self.engine_rows = Gauge(
            "loraplex_engine_decode_rows", "summed batch size of the decode steps", registry=r
        )
        self.prefix_cache_hit_tokens = Gauge(
            "loraplex_prefix_cache_hit_tokens",
            "prompt tokens whose keys and values came from the prefix cache",
            registry=r,
        )
        self.prefix_cache_queried_tokens = Gauge(
            "loraplex_prefix_cache_queried_tokens", "prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_cache_bytes = Gauge(
            "loraplex_prefix_cache_bytes", "bytes of keys and values in the prefix cache", registry=r
        )
        self.rag_search_seconds = Histogram(
            "loraplex_rag_search_seconds", "RAG retrieval latency", buckets=_LATENCY_BUCKETS, registry=r
        )

    def bind(self, state) -> None:
        """Gauges read live from the engine and registry at scrape time."""
        self.registry.register(LoraRequestsInfo(state))
        self.registry.register(FinishedRequests(state.engine.stats))
        self.queue_depth.set_function(lambda: state.engine.health().waiting)
        self.running.set_function(lambda: state.engine.health().running)
        self.resident_adapters.set_function(lambda: len(state.registry.resident()))
        self.adapter_loads.set_function(lambda: state.registry.stats.loads)
        self.adapter_evictions.set_function(lambda: state.registry.stats.evictions)
        self.adapter_load_seconds.set_function(lambda: state.registry.stats.last_load_seconds)
        stats = state.engine.stats
        self.engine_seconds.labels("prefill").set_function(lambda: stats.prefill_seconds)
        self.engine_seconds.labels("decode").set_function(lambda: stats.decode_seconds)
        self.engine_steps.set_function(lambda: stats.steps)
        self.engine_rows.set_function(lambda: stats.decode_rows)
        cache = getattr(getattr(state.engine, "runner", None), "prefix_cache", None)  # fake engines: none
        if cache is not None:
            self.prefix_cache_hit_tokens.set_function(lambda: cache.stats.hit_tokens)
            self.prefix_cache_queried_tokens.set_function(lambda: cache.stats.looked_up_tokens)
            self.prefix_cache_bytes.set_function(lambda: cache.num_bytes)


class LoraRequestsInfo:
    """vLLM's ``vllm:lora_requests_info`` gauge, so LoRA-affinity routers (the Gateway API inference
    extension's endpoint picker, llm-d) can route to loraplex as to vLLM: labels ``running_lora_adapters``
    and ``waiting_lora_adapters`` (comma-joined adapter names), ``max_lora`` (adapters resident at
    once); the value is the scrape's wall-clock time, as vLLM sets it to the time of its last update.
    """

    def __init__(self, state) -> None:
        self.state = state

    def describe(self) -> list:
        return []  # labels change at every scrape: nothing to check at registration

    def collect(self):
        health = self.state.engine.health()
        family = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        family.add_metric(
            [
                str(self.state.settings.max_loaded_adapters),
                ",".join(health.running_adapters),
                ",".join(health.waiting_adapters),
            ],
            time.time(),
        )
        yield family


class FinishedRequests:
    """``loraplex_finished_requests_total{reason}``: generations ended, by why (``stop``, ``length``,
    ``cancelled`` — the client went away or cancelled —, ``error``), as vLLM's
    ``vllm:request_success_total{finished_reason}`` plus the unsuccessful ones."""

    def __init__(self, stats) -> None:
        self.stats = stats

    def describe(self) -> list:
        return []  # a label appears with its first request

    def collect(self):
        family = CounterMetricFamily(
            "loraplex_finished_requests", "generations ended, by reason", labels=["reason"]
        )
        for reason, count in sorted(dict(self.stats.finished_by_reason).items()):
            family.add_metric([reason], count)
        yield family
