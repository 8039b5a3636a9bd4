"""Load-test harness of the fuelcard server: `fuelcard-loadtest`.

Seeds its own cards straight into the database (COPY), drives the server
through the generated gRPC stubs from several processes, measures latency
with HdrHistogram, checks the ledger after every run, and measures the two
ceilings (pgbench on the same SQL, a no-op RPC on the same server stack) in
the same run so throughput can be stated as ratios.
"""
