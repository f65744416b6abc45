"""Helpers shared by the test groups (and by benchmarks/bench_network.py), imported as `support.<module>`.

- cluster_fixtures: local bus + stage processes on 127.0.0.1 (`start_cluster`, the `cluster3` fixture);
- serve_fixtures: a `dair serve` process in front of a cluster;
- tiny_models: small GGUFs of every weight type written from numpy;
- numpy_reference: the independent plain-numpy float32 forward pass;
- netns: hosts as network namespaces; netns_client.py and delay_relay.py are scripts it runs by path;
- neon/harness.c: the NEON kernels' harness, cross-compiled by tests/unit/test_neon.py.

pyproject.toml's `pythonpath = ["tests"]` puts this package on the path of every pytest run.
"""
