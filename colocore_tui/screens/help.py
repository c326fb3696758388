"""The help screen (?): what the console shows and what each key does."""
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """[b]colocore-tui[/b]: watch a COLO-protected pair over QMP, act when a host dies.

[b]f[/b]  failover: pick the side that takes over; x-colo-lost-heartbeat is sent to it and the panels follow the failover state to completed
[b]p[/b]  pause / resume the primary's guest (stop / cont)
[b]d[/b]  set x-checkpoint-delay on the primary
[b]r[/b]  re-protect: the node serving alone under --arbiter protects itself onto a registered standby (the dialog shows which)
[b]?[/b]  this help          [b]q[/b]  quit (nodes started with --demo are stopped)

Panels: VM status, COLO mode, migration status, failover state, the arbiter (etcd healthy / unreachable / lost the key, lease left, whether output is released) and QMP link per node; CPU and RSS for nodes on this host. Timeline: one point per checkpoint (pause, dirty pages, bytes sent, compression ratio), p50/p99 pause, checkpoints/s and throughput over the last checkpoints. A node that goes away is shown as lost; the console reconnects.

Press Esc or ? to close."""


class HelpScreen(ModalScreen):
    BINDINGS = [("escape", "close", "close"), ("question_mark", "close", "close"),
                ("q", "close", "close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-dialog", classes="dialog"):
            yield Static(HELP)

    def action_close(self):
        self.dismiss(None)
