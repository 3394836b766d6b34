"""Unit-test fixtures shared between modules."""

from tests.unit.raw_http import serve

__all__ = ["serve"]
