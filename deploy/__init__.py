"""Deployment: the local multi-process harness used by tests and `syncrep demo`."""
