"""``make bench``: Galley's sync throughput and latency on MariaDB, each against a raw floor.

Not part of ``make test``: it needs a MariaDB server (``BENCH_MYSQL_URL``) and several minutes.
``python -m tests.bench.run --help`` lists the knobs.
"""
