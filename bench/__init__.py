"""senmon's benchmarks: each prints a table, writes JSON to bench/results/, compares side by side."""
