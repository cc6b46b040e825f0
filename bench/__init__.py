"""raymb's benchmarks (not tests): `python -m bench --help`; see bench/README.md."""
