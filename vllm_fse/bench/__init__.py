"""Benchmarks and accuracy A/B of FSE off vs on: ``vllm-fse bench {sweep,report,accuracy,profile}``."""
