"""The run layer: stage protocol and records, the Ray runtime, fault injection for tests."""
