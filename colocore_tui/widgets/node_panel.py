"""A panel per node: what it is, how it is reached, and its VM / COLO / failover state."""
from rich.table import Table
from rich.text import Text
from textual.widgets import Static


LINK_STYLE = {"connected": "green", "connecting": "yellow", "lost": "bold red"}
GOOD = {"running", "colo", "primary", "secondary", "completed", "connected", "none"}


def _value(text, style=None):
    return Text(str(text), style=style or "", no_wrap=True, overflow="ellipsis")


def short_address(address, width=26):
    """Keep the end of a long unix path (the socket's name is what tells nodes apart)."""
    if len(address) <= width:
        return address
    kind, _, rest = address.partition(":")
    return "%s:…%s" % (kind, rest[-(width - len(kind) - 2):])


class NodePanel(Static):
    """Shows one NodeView; `show(view)` redraws it."""

    def __init__(self, view, **kwargs):
        super().__init__(**kwargs)
        self.view = view
        self.border_title = view.role

    def on_mount(self):
        self.show(self.view)

    def show(self, view):
        self.view = view
        self.border_title = view.role
        self.border_subtitle = view.link
        self.set_class(view.link == "lost", "-lost")
        self.set_class(view.link == "connected", "-connected")
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column("what", style="bold", no_wrap=True, width=9)
        grid.add_column("value", ratio=1, no_wrap=True, overflow="ellipsis")
        link = _value(view.link, LINK_STYLE.get(view.link))
        if view.link != "connected" and view.link_error:
            link.append(" (%s)" % view.link_error, style="dim")
        grid.add_row("link", link)
        grid.add_row("address", _value(short_address(view.address), "dim"))
        stale = "dim" if view.link != "connected" else None
        grid.add_row("VM", _value(view.vm_status, stale or (
            "green" if view.vm_status == "running" else "yellow")))
        colo = _value(view.colo_mode, stale or ("green" if view.colo_mode in ("primary", "secondary")
                                                else None))
        if view.checkpoint_mode == "hybrid":
            colo.append(" hybrid", style=stale or "bold cyan")
        colo.append("  last %s / %s" % (view.last_mode, view.reason), style="dim")
        grid.add_row("COLO", colo)
        mig = _value(view.migration, stale)
        if view.checkpoints:
            mig.append("  %d checkpoints" % view.checkpoints, style="dim")
            if view.causes:
                mig.append(" (%s)" % view.causes, style="dim")
        grid.add_row("migration", mig)
        fo_style = stale or {"none": None, "completed": "bold green"}.get(view.failover, "bold yellow")
        failover = _value(view.failover, fo_style)
        if view.peer not in ("?", ""):
            failover.append("  peer %s" % view.peer, style="dim")
        grid.add_row("failover", failover)
        if view.network:
            grid.add_row("network", _value(view.network, stale or (
                "bold red" if "ERROR" in view.network else None)))
        if view.channel:
            secure = view.channel.startswith("tls") and "authenticated as" in view.channel
            grid.add_row("channel", _value(view.channel, stale or ("green" if secure else "yellow")))
        if view.arbiter:
            state = view.arbiter.split(",")[0]
            grid.add_row("arbiter", _value(view.arbiter, stale or (
                "green" if state == "healthy" else "bold red")))
        if view.pid is not None:
            cpu = "-" if view.cpu_percent is None else "%.0f%%" % view.cpu_percent
            rss = "-" if view.rss_bytes is None else "%d MiB" % (view.rss_bytes >> 20)
            grid.add_row("process", _value("pid %d  %s cpu  %s" % (view.pid, cpu, rss)))
        else:
            grid.add_row("process", _value("not local", "dim"))
        self.update(grid)
