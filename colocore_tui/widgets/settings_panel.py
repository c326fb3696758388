"""Migration capabilities and parameters of the primary; x-checkpoint-delay is editable (d)."""
from rich.text import Text
from textual.widgets import Static

from colocore_tui.model import human_bytes

EDITABLE = "x-checkpoint-delay"
UNITS = {"downtime-limit": "ms", "x-checkpoint-delay": "ms", "x-colo-heartbeat": "ms",
         "max-bandwidth": "B/s", "xbzrle-cache-size": "B"}
# shown first: what an operator of a protected pair looks at
FIRST = ("x-checkpoint-delay", "x-colo-heartbeat")


class SettingsPanel(Static):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.border_title = "primary settings"
        self.border_subtitle = "d: set delay"
        self.capabilities = {}
        self.parameters = {}

    def on_mount(self):
        self.show({}, {})

    def show(self, capabilities, parameters):
        self.capabilities = dict(capabilities)
        self.parameters = dict(parameters)
        text = Text(no_wrap=False)
        if not parameters and not capabilities:
            text.append("not read yet", style="dim")
        names = [n for n in FIRST if n in parameters] + \
                [n for n in parameters if n not in FIRST]
        for name in names:
            value, unit = parameters[name], UNITS.get(name, "")
            if unit.startswith("B") and isinstance(value, int):
                value, unit = human_bytes(value, unit[1:]), ""
            line = "%s %s %s" % (name, value, unit)
            if name == EDITABLE:
                text.append(line.rstrip() + "\n", style="bold")
            else:
                text.append(line.rstrip() + "\n")
            if name == FIRST[-1] or (name == EDITABLE and FIRST[-1] not in parameters):
                text.append(self._caps_line())
        if capabilities and not parameters:
            text.append(self._caps_line())
        self.update(text)

    def _caps_line(self):
        caps = Text("caps ")
        for name, state in self.capabilities.items():
            caps.append(name, style="bold green" if state else "dim")
            caps.append(" ")
        caps.append("\n")
        return caps
