"""Re-protection (r): the serving node protects itself onto a registered standby. Shows
the standby it will use before anything is sent. Returns the standby's id or None."""
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ProtectScreen(ModalScreen):
    BINDINGS = [("y", "choose(True)", "protect"), ("escape", "choose(False)", "cancel")]

    def __init__(self, role, standbys, error=None):
        super().__init__()
        self.role = role
        self.standbys = standbys
        self.error = error

    def compose(self) -> ComposeResult:
        nxt = next((s for s in self.standbys if s.get("next")), None)
        with Vertical(id="protect-dialog", classes="dialog"):
            yield Static("[b]Re-protect[/b] the %s (serving alone)" % self.role, classes="dialog-title")
            if nxt is None:
                body = self.error or "No standby is registered with the arbiter. Start one with " \
                    "--incoming tcp:HOST:PORT --arbiter ...,role=standby."
            else:
                others = [s["name"] for s in self.standbys if not s.get("next")]
                body = ("Standby it will use: [b]%s[/b] at %s%s\n\nSends x-colo-protect: the "
                        "standby receives a live copy while the guest serves on, then COLO "
                        "checkpoints begin.  y: protect   Esc: cancel"
                        % (nxt["name"], nxt["uri"],
                           "\nOther standbys: %s" % ", ".join(others) if others else ""))
            yield Static(body, classes="dialog-body")
            with Horizontal(classes="dialog-buttons"):
                if nxt is not None:
                    yield Button("Protect onto %s" % nxt["name"], id="protect", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event):
        self.dismiss(self._choice(event.button.id == "protect"))

    def action_choose(self, yes):
        self.dismiss(self._choice(yes))

    def _choice(self, yes):
        nxt = next((s for s in self.standbys if s.get("next")), None)
        return nxt["id"] if yes and nxt is not None else None
