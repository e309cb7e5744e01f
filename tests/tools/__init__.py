"""Tool tests: the benchmarks and the comparison run in their quick form, the crash storm runs
short, and the documentation's code (README, docs/, examples) runs as written."""
