"""What the console knows about the nodes and the checkpoints: plain data, no Textual.

Everything here is filled from QMP answers and events (see watcher.py) and read by the
widgets; tests build it from fixed data.
"""
import collections
import dataclasses

from colocore.tools.stats import percentile

# How many checkpoints the timeline keeps (and its figures summarise).
HISTORY = 300


@dataclasses.dataclass
class NodeView:
    """One node as the console last saw it."""
    role: str                        # "primary" | "secondary" (the side it started as)
    address: str
    link: str = "connecting"         # connecting | connected | lost
    link_error: str = ""
    vm_status: str = "?"
    colo_mode: str = "?"
    last_mode: str = "?"
    reason: str = "?"
    migration: str = "?"
    failover: str = "?"
    peer: str = "?"
    checkpoints: int = 0
    checkpoint_mode: str = ""        # periodic | hybrid (query-colo-status checkpoint-mode)
    causes: str = ""                 # checkpoints by cause, those that happened (causes_summary)
    network: str = ""                # the network side of COLO, summed up (net_summary)
    arbiter: str = ""                # "" without --arbiter; else state, role, lease
    arbiter_role: str = ""           # serving | secondary | standby | none
    channel: str = ""                # the migration channel: TLS, and the peer's identity
    pid: int | None = None           # known for local nodes only
    cpu_percent: float | None = None
    rss_bytes: int | None = None

    def apply(self, fields):
        for key, value in fields.items():
            setattr(self, key, value)


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    """One COLO_CHECKPOINT event of the primary."""
    checkpoint_id: int
    stamp: float                     # the event's timestamp (seconds, host clock of the node)
    pause_ms: float
    dirty_pages: int
    bytes_sent: int
    compression_ratio: float
    latency_ms: float
    net_held: int = 0                # frames the guest sent in the epoch, held until it
    net_released: int = 0            # frames written to the tap since the last checkpoint
    net_rx: int = 0                  # frames the guest consumed in the epoch
    net_mirrored: int = 0            # frames mirrored toward the secondary in the epoch

    @classmethod
    def from_event(cls, data, stamp):
        return cls(checkpoint_id=int(data.get("id", 0)), stamp=float(stamp),
                   pause_ms=float(data.get("pause-ms", 0.0)),
                   dirty_pages=int(data.get("dirty-pages", 0)),
                   bytes_sent=int(data.get("bytes", 0)),
                   compression_ratio=float(data.get("compression-ratio", 0.0)),
                   latency_ms=float(data.get("latency-ms", 0.0)),
                   net_held=int(data.get("net-held", 0)),
                   net_released=int(data.get("net-released", 0)),
                   net_rx=int(data.get("net-rx", 0)),
                   net_mirrored=int(data.get("net-mirrored", 0)))


class CheckpointHistory:
    """The last HISTORY checkpoints and running figures over them."""

    def __init__(self, size=HISTORY):
        self.records = collections.deque(maxlen=size)
        self.total = 0                      # checkpoints seen since the console started

    def add(self, record):
        if self.records and record.checkpoint_id <= self.records[-1].checkpoint_id \
                and record.stamp <= self.records[-1].stamp:
            return False                    # a replay after a reconnect
        self.records.append(record)
        self.total += 1
        return True

    def __len__(self):
        return len(self.records)

    def series(self, field):
        return [getattr(r, field) for r in self.records]

    @property
    def last(self):
        return self.records[-1] if self.records else None

    def pause_percentiles(self):
        pauses = [r.pause_ms for r in self.records]
        return percentile(pauses, 50), percentile(pauses, 99)

    def span_s(self):
        if len(self.records) < 2:
            return 0.0
        return self.records[-1].stamp - self.records[0].stamp

    def per_second(self):
        span = self.span_s()
        return (len(self.records) - 1) / span if span > 0 else 0.0

    def throughput(self):
        """Bytes per second on the wire over the window."""
        span = self.span_s()
        if span <= 0:
            return 0.0
        return sum(r.bytes_sent for r in list(self.records)[1:]) / span


def causes_summary(causes):
    """query-colo-status "checkpoint-causes" -> "mismatch 3, periodic 12" (causes seen)."""
    if not causes:
        return ""
    return ", ".join("%s %d" % (k, v) for k, v in causes.items() if v)


def net_summary(net):
    """query-colo-status "net" -> one line for a node panel: frames held and released
    (a primary), mirrored and in the log (a secondary), replayed at a takeover."""
    if not net:
        return ""
    parts = []
    takeover = net.get("takeover")
    if takeover:
        parts.append("replayed %d" % takeover.get("replayed", 0))
        if takeover.get("error"):
            parts.append("ERROR %s" % takeover["error"])
        elif takeover.get("replay-skipped"):
            parts.append("replay skipped")
    log = net.get("log")
    if log and not takeover:
        parts.append("mirrored %d, log %d%s" % (log.get("logged", 0), log.get("log-frames", 0),
                                                "" if log.get("replayable") else " (replay off)"))
    cmp = net.get("compare")
    if cmp:
        parts.append("compared %d, matched %d, mismatched %d" % (
            cmp.get("compared", 0), cmp.get("matched", 0), cmp.get("mismatched", 0)))
    if not log:
        parts.append("held %d, released %d" % (net.get("held", 0), net.get("released-total", 0)))
        if net.get("mirrored") is not None:
            parts.append("mirrored %d" % net["mirrored"])
    return ", ".join(parts)


def arbiter_summary(arb):
    """query-colo-status's arbiter member -> one line for a node panel."""
    if not arb:
        return ""
    text = "%s, %s" % (arb.get("state", "?"), arb.get("role") or "none")
    if arb.get("role") == "serving":
        text += ", lease %d ms, output %s" % (arb.get("lease-ms", 0),
                                              "released" if arb.get("may-release") else "held")
    elif arb.get("holder"):
        text += ", holder %s" % arb["holder"]
    if arb.get("override"):
        text += ", OVERRIDDEN"
    if arb.get("standbys"):
        text += ", standbys: %s" % ", ".join(arb["standbys"])
    return text


def human_bytes(n, suffix=""):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return ("%d %s%s" if unit == "B" else "%.1f %s%s") % (n, unit, suffix)
        n /= 1024
    return "%.1f GiB%s" % (n, suffix)
