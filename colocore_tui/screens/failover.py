"""Failover confirmation: which side takes over? Returns "secondary", "primary" or None."""
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class FailoverScreen(ModalScreen):
    BINDINGS = [("s", "choose('secondary')", "secondary takes over"),
                ("p", "choose('primary')", "primary alone"),
                ("escape", "choose(None)", "cancel")]

    def __init__(self, primary, secondary):
        super().__init__()
        self.primary = primary
        self.secondary = secondary

    def compose(self) -> ComposeResult:
        p, s = self.primary, self.secondary
        with Vertical(id="failover-dialog", classes="dialog"):
            yield Static("[b]Failover[/b]: which side takes over?", classes="dialog-title")
            yield Static(
                "primary   %s, VM %s, COLO %s\nsecondary %s, VM %s, COLO %s\n\n"
                "Sends x-colo-lost-heartbeat to the node you pick: the secondary starts "
                "the guest from its last checkpoint, or the primary leaves COLO and serves "
                "alone.  s: secondary   p: primary   Esc: cancel" % (p.link, p.vm_status, p.colo_mode, s.link, s.vm_status, s.colo_mode),
                classes="dialog-body")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Secondary takes over", id="secondary", variant="error")
                yield Button("Primary alone", id="primary", variant="warning")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event):
        self.dismiss(None if event.button.id == "cancel" else event.button.id)

    def action_choose(self, side):
        self.dismiss(side)
