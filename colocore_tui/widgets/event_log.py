"""The event log: node events, errors and connection changes, each with its time."""
import time

from rich.text import Text
from textual.widgets import RichLog

SEVERITY_STYLE = {"info": "", "good": "green", "warn": "yellow", "error": "bold red"}


def clock(stamp):
    return time.strftime("%H:%M:%S", time.localtime(stamp)) + (".%03d" % int(stamp % 1 * 1000))


class EventLog(RichLog):
    def __init__(self, **kwargs):
        super().__init__(wrap=False, markup=False, max_lines=2000, auto_scroll=True, **kwargs)
        self.border_title = "events"
        self.entries = []            # (stamp, role, text, severity): what tests look at

    def add(self, stamp, role, text, severity="info"):
        self.entries.append((stamp, role, text, severity))
        line = Text(clock(stamp), style="dim")
        line.append(" %-9s " % role, style="bold")
        line.append(text, style=SEVERITY_STYLE.get(severity, ""))
        self.write(line)
