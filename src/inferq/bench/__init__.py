"""Benchmarks: importable measurement functions behind `inferq bench`."""
