"""Fixtures for the simulator, the benchmarks and the tests, outside the daemon's packages.

`corpora`: the offline built-in data sets and their seeded split into peer shards;
`loopback`: swarms of synthetic peers (real libp2p hosts, stand-in adapters) on 127.0.0.1;
`wan`: a TCP proxy that puts a wide-area link (delay, jitter, rate) in front of a listener;
`natlab`: public hosts and home hosts behind masquerading routers, in network namespaces (root);
`labpeers`: real `loraswarm peer` daemons run in those namespaces.
"""
