"""Entry points: run, nightly, submit, query, demo, bench."""
