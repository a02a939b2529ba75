"""``GET /v1/models/{id}``: one model (base, adapter, cached merge, embedder), tenant-scoped."""
