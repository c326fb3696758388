"""Ask for a new x-checkpoint-delay (ms). Returns the number, or None if cancelled."""
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

MAX_DELAY_MS = 1 << 31


class DelayScreen(ModalScreen):
    BINDINGS = [("escape", "cancel", "cancel")]

    def __init__(self, current):
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="delay-dialog", classes="dialog"):
            yield Static("[b]x-checkpoint-delay[/b] (ms between checkpoints)", classes="dialog-title")
            yield Input(value="" if self.current is None else str(self.current),
                        type="integer", id="delay-input", placeholder="e.g. 200")
            yield Static("Enter: set on the primary (a checkpoint follows at once)   Esc: cancel",
                         id="delay-hint", classes="dialog-body")

    def on_mount(self):
        self.query_one(Input).focus()

    def on_input_submitted(self, event):
        try:
            value = int(event.value)
        except ValueError:
            value = -1
        if not 0 <= value <= MAX_DELAY_MS:
            self.query_one("#delay-hint", Static).update(
                "[red]a whole number of milliseconds from 0 to %d, please[/red]" % MAX_DELAY_MS)
            return
        self.dismiss(value)

    def action_cancel(self):
        self.dismiss(None)
