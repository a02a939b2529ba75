"""The deployable server: configuration, the HTTP API and the generation engine."""
