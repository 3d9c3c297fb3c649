"""The recipe tests use the session fixture `run_recipe` of `tests/conftest.py`, which runs
`kdtfp run RECIPE --quick` in a subprocess and shares each run with the determinism test."""
