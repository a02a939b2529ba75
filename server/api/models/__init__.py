"""The models the caller may use: ``GET /v1/models`` and ``GET /v1/models/{id}``, tenant-scoped."""
