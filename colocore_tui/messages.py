"""Messages the workers post to the app: every QMP answer and event reaches the UI this way."""
import time

from textual.message import Message


class LinkChanged(Message):
    """The QMP connection to a node came up, or went away (state: connecting|connected|lost)."""

    def __init__(self, role, state, error="", stamp=None):
        super().__init__()
        self.role = role
        self.state = state
        self.error = error
        self.stamp = time.time() if stamp is None else stamp


class NodeStatus(Message):
    """Fresh figures of a node (a dict of NodeView fields)."""

    def __init__(self, role, fields, stamp=None):
        super().__init__()
        self.role = role
        self.fields = fields
        self.stamp = time.time() if stamp is None else stamp


class NodeEvent(Message):
    """A QMP event of a node (STOP, RESUME, MIGRATION, COLO_EXIT, COLO_CHECKPOINT, ...)."""

    def __init__(self, role, name, data, stamp):
        super().__init__()
        self.role = role
        self.name = name
        self.data = data
        self.stamp = stamp


class SettingsRead(Message):
    """Capabilities ({name: bool}) and parameters ({name: value}) of a node."""

    def __init__(self, role, capabilities, parameters):
        super().__init__()
        self.role = role
        self.capabilities = capabilities
        self.parameters = parameters


class CommandDone(Message):
    """An operator command finished (ok or not); `text` says what happened."""

    def __init__(self, role, command, ok, text, stamp):
        super().__init__()
        self.role = role
        self.command = command
        self.ok = ok
        self.text = text
        self.stamp = stamp


class DemoState(Message):
    """The --demo pair: what it is doing (starting, protected, failed: ...)."""

    def __init__(self, text, ok=True, stamp=None):
        super().__init__()
        self.text = text
        self.ok = ok
        self.stamp = time.time() if stamp is None else stamp
