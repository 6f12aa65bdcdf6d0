"""Development tooling: local swarms of real node processes for the demo, tests and benchmarks."""
