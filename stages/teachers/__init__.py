"""Teachers: the registry of frozen models, stage one's extraction, and where stage two's teacher outputs come from."""
