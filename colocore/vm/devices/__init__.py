"""Guest-visible devices. Each device has `save() -> dict`, `load(dict)` and `reset()`;
the machine frames their state into the DEVICES section (bytes as base64)."""
