"""The reproduction driver's parts; `benchmarks/reproduce.py` is its command line."""
