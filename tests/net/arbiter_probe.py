"""A bare arbiter in its own process, for the partition tests: run on a test host with
`ip netns exec`, it serves (or contends for) KEY and prints one JSON line per fact, with
the host's CLOCK_MONOTONIC (shared by all namespaces), so a test can order what two
hosts did:

    {"event": "renewed", "until": T}    the fence is open until local time T
    {"event": "won", "t": T}            this probe won KEY at T (a takeover)
    {"event": "health", "state": S}     healthy / etcd unreachable / lost the key
    {"event": "stale", "reason": R}     this contender may never win

usage: arbiter_probe.py SPEC NAME serve|contend [PAIR]
"""
import json
import signal
import sys
import time

from colocore.arbiter import Arbiter, Stale, parse_arbiter


def say(**fields):
    print(json.dumps(dict(fields, t=time.monotonic())), flush=True)


def main():
    spec, name, mode = parse_arbiter(sys.argv[1]), sys.argv[2], sys.argv[3]
    pair = sys.argv[4] if len(sys.argv) > 4 else None
    a = Arbiter(spec, name, on_change=lambda st: say(event="health", state=st["state"],
                                                     role=st["role"]))
    renewed = a.fence.renewed

    def traced(t0, ttl):
        renewed(t0, ttl)
        say(event="renewed", until=a.fence._lease_until)
    a.fence.renewed = traced
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if mode == "serve":
        a.serve_fresh()
        if pair:
            a.set_pair(pair)
    else:
        try:
            a.take_over(pair=pair)
        except Stale as exc:
            say(event="stale", reason=str(exc))
            return
        say(event="won", at=a.takeover_at)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
