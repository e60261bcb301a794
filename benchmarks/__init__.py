"""Runnable benchmarks for segguard (issue 5). Not tests: they print figures and write
JSON into benchmarks/results/; nothing here asserts a timing."""
