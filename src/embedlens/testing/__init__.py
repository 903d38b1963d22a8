"""Helpers for tests: tiny random VLMs with offline processors (no model hub)."""

from embedlens.testing.tiny import TINY_ARCHS, build_tiny_model

__all__ = ["TINY_ARCHS", "build_tiny_model"]
