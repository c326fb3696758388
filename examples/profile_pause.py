"""Where a checkpoint pause goes, step by step, and what dirty tracking costs the guest.

Runs the `dirtier` guest in this process (no pair, no network) and times the steps of
the primary's pause path (checkpoint.Stager.stage) one by one: park the vCPU, harvest
the dirty log, gather the dirty pages, read the vCPU state, read the device state,
unpark. Then measures how fast the guest re-dirties pages right after a harvest: each
first write to a page after its dirty bit was cleared takes a write-protect fault.

Run (root, /dev/kvm):  .venv/bin/python examples/profile_pause.py [WSS ...]
"""
import statistics
import sys
import time

from colocore.vm.machine import Machine
from colocore_ext import pages


def pause_steps(wss, rounds=100, gap_s=0.1):
    m = Machine(256 << 20, "profile", on_event=lambda *a: None)
    try:
        m.boot("dirtier", "wss=%d" % wss)
        m.console_out.attach(lambda fn, *a: None)
        m.serial_out.attach(lambda fn, *a: None)
        m.start_thread()
        m.resume()
        time.sleep(0.5)
        was = m.park_quietly()
        m.memory.harvest()                      # the first harvest returns every page
        m.unpark_quietly(was)
        staging = bytearray(max(wss, 1) * 4096)
        steps = {k: [] for k in ("park", "harvest", "gather", "vcpu", "devices", "unpark",
                                 "total")}
        dirty = []
        for _ in range(rounds):
            time.sleep(gap_s)
            t0 = time.perf_counter()
            was = m.park_quietly()
            t1 = time.perf_counter()
            pfns = m.memory.harvest()
            t2 = time.perf_counter()
            if len(staging) < len(pfns) * 4096:
                staging = bytearray(len(pfns) * 4096)
            pages.gather(m.memory.ram, pfns, staging)
            t3 = time.perf_counter()
            m.vcpu.get_state()
            t4 = time.perf_counter()
            m.device_states()
            t5 = time.perf_counter()
            m.unpark_quietly(was)
            t6 = time.perf_counter()
            dirty.append(len(pfns))
            for name, a, b in (("park", t0, t1), ("harvest", t1, t2), ("gather", t2, t3),
                               ("vcpu", t3, t4), ("devices", t4, t5), ("unpark", t5, t6),
                               ("total", t0, t6)):
                steps[name].append((b - a) * 1000)
        print("wss=%d: %d pause rounds, dirty pages per round (median) %d"
              % (wss, rounds, statistics.median(dirty)))
        for name, v in steps.items():
            v.sort()
            print("  %-8s p50 %7.3f ms   p90 %7.3f ms   p99 %7.3f ms"
                  % (name, v[len(v) // 2], v[int(len(v) * 0.9)], v[int(len(v) * 0.99)]))
    finally:
        m.close()


def refault_cost(rounds=15):
    """Microseconds of guest time per page re-dirtied after a harvest (write-protect)."""
    m = Machine(256 << 20, "refault", on_event=lambda *a: None)
    try:
        m.boot("dirtier", "wss=60000")          # more pages than it can re-dirty in 40 ms
        m.console_out.attach(lambda fn, *a: None)
        m.serial_out.attach(lambda fn, *a: None)
        m.start_thread()
        m.resume()
        time.sleep(0.5)

        def harvest():
            was = m.park_quietly()
            try:
                return m.memory.harvest()
            finally:
                m.unpark_quietly(was)
        harvest()
        for window_ms in (10, 20, 40):
            per_page = []
            for _ in range(rounds):
                harvest()
                t0 = time.perf_counter()
                time.sleep(window_ms / 1000)
                n = len(harvest())
                per_page.append((time.perf_counter() - t0) * 1e6 / max(n, 1))
            print("re-dirty after a harvest, %2d ms window: %.2f us per page (median of %d)"
                  % (window_ms, statistics.median(per_page), rounds))
    finally:
        m.close()


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["0", "1000", "10000"]:
        pause_steps(int(arg))
    refault_cost()
