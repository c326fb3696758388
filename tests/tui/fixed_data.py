"""Fixed data for the console's snapshot tests: a protected pair with 300 checkpoints
behind it and a few events. No clock, no psutil: every figure is made up here."""
from colocore_tui.messages import LinkChanged, SettingsRead, NodeEvent, NodeStatus

T0 = 1_700_000_000.0          # 2023-11-14 22:13:20 UTC
PRIMARY = "unix:/run/colocore/primary-qmp.sock"
SECONDARY = "unix:/run/colocore/secondary-qmp.sock"


def checkpoint(i):
    """Checkpoint i: a steady load with a burst of dirty pages every 50 checkpoints."""
    burst = i % 50 in (20, 21, 22)
    dirty = 1200 + (i * 37) % 300 if burst else 40 + (i * 13) % 60
    pause = 0.3 + dirty * 0.0021 + ((i * 7) % 10) * 0.02
    sent = dirty * 1700 + 9000
    return NodeEvent("primary", "COLO_CHECKPOINT",
                     {"id": i, "pause-ms": round(pause, 3), "dirty-pages": dirty, "bytes": sent,
                      "compression-ratio": round(4096 * dirty / sent + 0.5, 3),
                      "latency-ms": round(pause + 1.2, 3), "net-held": 18 + (i * 5) % 11,
                      "net-released": 18 + (i * 5 + 3) % 11, "net-rx": 20 + (i * 3) % 9,
                      "net-mirrored": 21 + (i * 3) % 9},
                     T0 + i * 0.2)


def messages():
    yield LinkChanged("primary", "connected", stamp=T0)
    yield LinkChanged("secondary", "connected", stamp=T0 + 0.002)
    yield NodeEvent("secondary", "MIGRATION", {"status": "active"}, T0 + 0.1)
    yield NodeEvent("primary", "MIGRATION", {"status": "colo"}, T0 + 0.34)
    yield NodeEvent("secondary", "MIGRATION", {"status": "colo"}, T0 + 0.35)
    yield SettingsRead("primary",
                            {"xbzrle": False, "compress": False, "events": False,
                             "x-colo": True, "return-path": False},
                            {"downtime-limit": 300, "max-bandwidth": 134217728,
                             "xbzrle-cache-size": 67108864, "x-checkpoint-delay": 200,
                             "x-colo-heartbeat": 0})
    for i in range(1, 321):
        yield checkpoint(i)
    yield NodeEvent("primary", "STOP", {}, T0 + 61.0)
    yield NodeEvent("primary", "RESUME", {}, T0 + 62.5)
    yield NodeStatus("primary", {"vm_status": "running", "colo_mode": "primary",
                                 "last_mode": "none", "reason": "none", "migration": "colo",
                                 "failover": "none", "peer": "connected", "checkpoints": 320,
                                 "network": "held 4, released 7021, mirrored 7394",
                                 "channel": "plain tcp, not authenticated",
                                 "pid": 4242, "cpu_percent": 38.0, "rss_bytes": 301 << 20},
                     stamp=T0 + 64)
    yield NodeStatus("secondary", {"vm_status": "colo", "colo_mode": "secondary",
                                   "last_mode": "none", "reason": "none", "migration": "colo",
                                   "failover": "none", "peer": "connected", "checkpoints": 320,
                                   "network": "mirrored 7394, log 3",
                                   "channel": "plain tcp, not authenticated",
                                   "pid": 4241, "cpu_percent": 12.0, "rss_bytes": 290 << 20},
                     stamp=T0 + 64)


async def feed(pilot):
    for msg in messages():
        pilot.app.post_message(msg)
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()
