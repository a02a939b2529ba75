"""The generation engine: one thread owns the model; requests join and leave a running batch per step."""
