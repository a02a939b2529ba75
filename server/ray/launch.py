"""``loraplex ray serve``: connect to (or start) Ray, run the application, stop it on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import math
import signal
import threading
from pathlib import Path

from server.config import Settings
from server.ray.app import APP_NAME, RayOptions, build_application

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def start(settings: Settings, options: RayOptions) -> bool:
    """Connects to Ray (or starts a local instance) and runs the application on ``settings.port``.

    Returns:
        Whether a local Ray instance was started (and so should be shut down by :func:`stop`).
    """
    import ray
    from ray import serve

    local = options.address is None
    if local:
        # Workers import this checkout, not whatever `loraplex` another environment has installed.
        ray.init(
            num_cpus=max(1, int(options.replicas * options.cpus_per_replica)),
            num_gpus=math.ceil(options.replicas * options.gpus_per_replica),
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
            include_dashboard=False,
        )
    else:
        ray.init(address=options.address)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings, options), name=APP_NAME, route_prefix="/")
    logger.info(
        "serving on http://%s:%s with %d engine replicas", settings.host, settings.port, options.replicas
    )
    return local


def stop(local: bool) -> None:
    """Drains and deletes the application; shuts a local Ray instance down."""
    import ray
    from ray import serve

    serve.delete(APP_NAME)
    if local:
        serve.shutdown()
        ray.shutdown()
    logger.info("application %s stopped", APP_NAME)


def serve_until_signalled(settings: Settings, options: RayOptions) -> int:
    """Runs until SIGINT or SIGTERM, then drains (``--shutdown-grace-seconds``) and stops."""
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    local = start(settings, options)
    try:
        stopping.wait()
    finally:
        stop(local)
    return 0
