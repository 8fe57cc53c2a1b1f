"""Benchmarks: our pipelines against diffusers' on the same weights (`python -m bench`, see bench/README.md)."""
