"""The RAG deployment's handle without a Ray instance, for fast tests of what crosses it.

Each call runs the deployment's own dispatch (:func:`server.ray.rag_replica.call_manager`) on a
manager in this process; arguments, result and error make a pickle round trip, as they do between
Ray workers, and an error comes back as Ray Serve raises it: a ``RayTaskError`` whose ``cause`` is
the error (``as_instanceof_cause``, so it is also an instance of the error's class).
"""

from __future__ import annotations

import os
import traceback
from typing import Any

from ray import cloudpickle

from rag.collections import CollectionManager
from server.ray.rag_replica import call_manager


def _round_trip(value: Any) -> Any:
    return cloudpickle.loads(cloudpickle.dumps(value))


class InProcessResponse:
    def __init__(self, call: Any):
        self._call = call

    def result(self) -> Any:
        return self._call()


class InProcessRagHandle:
    """``handle.call.remote(method, *args, **kwargs).result()`` as on the RAG deployment's handle.

    Args:
        manager: the collections the calls reach.
        failure: raised by every call instead (what Ray raises when the deployment is unreachable).
    """

    def __init__(self, manager: CollectionManager | None, failure: BaseException | None = None):
        self.manager = manager
        self.failure = failure
        self.call = self

    def remote(self, method: str, *args: Any, **kwargs: Any) -> InProcessResponse:
        return InProcessResponse(lambda: self._run(method, _round_trip(args), _round_trip(kwargs)))

    def _run(self, method: str, args: tuple, kwargs: dict) -> Any:
        from ray.exceptions import RayTaskError

        if self.failure is not None:
            raise self.failure
        try:
            value = call_manager(self.manager, method, args, kwargs)
        except Exception as e:
            error = RayTaskError(
                "RagReplica.call", traceback.format_exc(), e, "ray::RagReplica", os.getpid(), "127.0.0.1"
            )
            raise _round_trip(error).as_instanceof_cause() from None
        return _round_trip(value)
