"""Schemathesis against the app's own OpenAPI schema: no input, valid or not, gets a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES_PER_OPERATION = 8


def _send(client, case):
    kwargs = {"params": case.query or None, "headers": {k: str(v) for k, v in (case.headers or {}).items()}}
    if isinstance(case.body, (bytes, str)):
        kwargs["content"] = case.body
        kwargs["headers"]["content-type"] = case.media_type or "application/json"
    elif case.body is not None and not isinstance(case.body, schemathesis.core.NotSet):
        kwargs["json"] = case.body
    return client.request(case.method, case.formatted_path, **kwargs)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_5xx_for_generated_requests(client, mode):
    schema = schemathesis.openapi.from_dict(client.app.openapi())
    statuses: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(operation.as_strategy(generation_mode=mode))
        def check(case):
            response = _send(client, case)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text)
            assert "Traceback" not in response.text

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid (e.g. GET /health in negative mode)
            continue
    assert statuses and client.get("/health").status_code == 200
