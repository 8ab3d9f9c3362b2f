"""Benchmarks: each of the project's performance figures against a baseline measured in the same run.

Run `python -m bench` (or `./tasks.sh bench`); see bench/RESULTS.md for the figures on this machine.
Not part of the test suite; tests/test_bench.py runs it at tiny size to keep it working.
"""
