"""Benchmarks of the sync against the sandbox APIs with their published limits on (`make bench`)."""
