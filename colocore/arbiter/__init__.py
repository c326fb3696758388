"""The arbiter: an etcd lease decides which node may serve (knows nothing of COLO).

    spec         --arbiter etcd:URL,key=KEY[,ttl=MS][,role=...] parsed and checked
    fence        the fencing clock: may this node release output now (lease + margin)
    etcd         the etcd client (etcd3gw): leases, keys, one-transaction compares
    arbiter      one node's arbiter: serve, renew, record the pair, take over, standbys

COLO's use of it is wired in colocore/control/arbiter.py; an etcd server for tests,
benchmarks and the demo is colocore/tools/etcd.py.
"""
from colocore.arbiter.arbiter import Arbiter, Health, Held, Stale
from colocore.arbiter.spec import ArbiterSpec, parse_arbiter

__all__ = ["Arbiter", "ArbiterSpec", "Health", "Held", "Stale", "parse_arbiter"]
