"""The checkpoint timeline: live charts over the last checkpoints and running figures."""
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Sparkline, Static

from colocore_tui.model import human_bytes

# (record field, label, value format)
CHARTS = (
    ("pause_ms", "pause", lambda v: "%.2f ms" % v),
    ("dirty_pages", "dirty", lambda v: "%d pg" % v),
    ("bytes_sent", "sent", lambda v: human_bytes(v)),
    ("compression_ratio", "ratio", lambda v: "%.1fx" % v),
    ("net_held", "held", lambda v: "%d fr" % v),
)


class CheckpointTimeline(Vertical):
    """One sparkline per figure; `show(history)` redraws from a CheckpointHistory."""

    def __init__(self, history, **kwargs):
        super().__init__(**kwargs)
        self.history = history
        self.border_title = "checkpoints"

    def compose(self) -> ComposeResult:
        yield Static(id="cp-figures")
        for field, label, _ in CHARTS:
            with Horizontal(classes="chart-row"):
                yield Static(label, id="label-%s" % field, classes="chart-label")
                yield Sparkline([], id="chart-%s" % field, classes="chart")

    def on_mount(self):
        self.show(self.history)

    def show(self, history):
        self.history = history
        last = history.last
        if last is None:
            figures = "no checkpoints yet"
        else:
            p50, p99 = history.pause_percentiles()
            figures = ("#%d  pause p50 %.2f ms  p99 %.2f ms  %.1f cp/s  %s"
                       % (last.checkpoint_id, p50, p99, history.per_second(),
                          human_bytes(history.throughput(), "/s")))
            if last.net_held or last.net_released or last.net_rx or last.net_mirrored:
                figures += "  net: %d held, %d released, %d in, %d mirrored" % (
                    last.net_held, last.net_released, last.net_rx, last.net_mirrored)
        self.query_one("#cp-figures", Static).update(figures)
        self.border_subtitle = "last %d of %d" % (len(history), history.total) if len(history) else ""
        for field, label, fmt in CHARTS:
            value = "-" if last is None else fmt(getattr(last, field))
            self.query_one("#label-%s" % field, Static).update("%-5s %9s" % (label, value))
            self.query_one("#chart-%s" % field, Sparkline).data = history.series(field)
