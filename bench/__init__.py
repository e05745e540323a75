"""Benchmarks for lora-gateway: not part of the installed wheel. See bench/README.md."""
