"""Scenarios: the demo, the benchmark and the counter workload they migrate (never product code)."""
