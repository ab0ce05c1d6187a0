"""Benchmarks for routeyard: a fast fake engine, load drivers and a one-command report.

Run ``python -m benchmarks.run`` (see ``benchmarks/README.md``).
"""
