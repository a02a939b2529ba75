"""Fixtures shared across the API tests."""

from tests.server.api.test_merge_api import roomy_client  # noqa: F401 - a fixture
from tests.server.api.test_security import secured  # noqa: F401 - a fixture
