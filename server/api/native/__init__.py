"""LoRAX/TGI native generation: ``POST /generate``, ``/generate_stream``, ``/`` and ``GET /info``."""
