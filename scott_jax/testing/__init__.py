"""Fixtures shared by the tests and the benchmarks (importing them needs no torch; building them does)."""
