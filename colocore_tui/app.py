"""colocore-tui: the operator's console for a COLO-protected pair, over QMP only.

    colocore-tui --primary unix:/path/p-qmp.sock --secondary unix:/path/s-qmp.sock
    colocore-tui --demo

`create_app()` builds the app for both the console script and the tests.
"""
import argparse
import functools
import sys
import time

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.css.query import NoMatches
from textual.widgets import Footer, Header

from colocore_tui.link import CommandFailed, LinkLost
from colocore_tui.messages import (CommandDone, DemoState, LinkChanged, NodeEvent, SettingsRead,
                       NodeStatus)
from colocore_tui.model import CheckpointHistory, CheckpointRecord, NodeView
from colocore_tui.screens.delay import DelayScreen
from colocore_tui.screens.failover import FailoverScreen
from colocore_tui.screens.help import HelpScreen
from colocore_tui.screens.protect import ProtectScreen
from colocore_tui.watcher import NodeWatcher
from colocore_tui.widgets.event_log import EventLog
from colocore_tui.widgets.node_panel import NodePanel
from colocore_tui.widgets.settings_panel import SettingsPanel
from colocore_tui.widgets.timeline import CheckpointTimeline

ROLES = ("primary", "secondary")


def _ui_gone_ok(handler):
    """Worker messages may still arrive while the app is shutting down and its widgets are
    gone: drop them then instead of failing the shutdown."""
    @functools.wraps(handler)
    def wrapper(self, msg):
        try:
            return handler(self, msg)
        except (NoMatches, IndexError):
            if self._exit or not self.is_running:
                return None
            raise
    return wrapper


class ColocoreConsole(App):
    CSS_PATH = "console.tcss"
    TITLE = "colocore"
    BINDINGS = [
        Binding("f", "failover", "Failover"),
        Binding("p", "pause", "Pause/resume"),
        Binding("d", "delay", "Checkpoint delay"),
        Binding("r", "protect", "Re-protect"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, addresses, demo=None, watch=True, opener=None):
        super().__init__()
        self.addresses = dict(addresses)
        self.demo = demo
        self.watch_nodes = watch
        self.opener = opener
        self.views = {role: NodeView(role, self.addresses.get(role, "-")) for role in ROLES}
        self.history = CheckpointHistory()
        self.watchers = {}
        self.sub_title = "demo pair" if demo else " / ".join(
            self.addresses.get(r, "-") for r in ROLES)

    # ---- layout ---------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        with Horizontal(id="nodes"):
            for role in ROLES:
                yield NodePanel(self.views[role], id="panel-%s" % role, classes="node-panel")
        yield CheckpointTimeline(self.history, id="timeline")
        with Horizontal(id="bottom"):
            yield EventLog(id="events")
            yield SettingsPanel(id="settings")
        yield Footer()

    def on_mount(self):
        if self.demo is not None:
            self.start_demo()
        if not self.watch_nodes:
            return
        for role in ROLES:
            if role not in self.addresses:
                continue
            kwargs = {} if self.opener is None else {"opener": self.opener}
            watcher = NodeWatcher(role, self.addresses[role], self.post_message, **kwargs)
            self.watchers[role] = watcher
            self.run_worker(watcher.run(), name="watch-%s" % role, group="watchers",
                            exit_on_error=False)

    def on_unmount(self):
        if self.demo is not None:
            self.demo.close()

    # ---- what the workers report ----------------------------------------------------

    def _main(self, selector, expect_type=None):
        """A widget of the main screen (App.query_one looks at the top screen, which is a
        dialog while one is open)."""
        return self.screen_stack[0].query_one(selector, expect_type)

    def _panel(self, role):
        return self._main("#panel-%s" % role, NodePanel)

    def log_event(self, stamp, role, text, severity="info"):
        self._main(EventLog).add(stamp, role, text, severity)

    @_ui_gone_ok
    def on_link_changed(self, msg: LinkChanged):
        view = self.views[msg.role]
        before = view.link
        view.apply({"link": msg.state, "link_error": msg.error})
        if msg.state == "lost":
            view.cpu_percent = view.rss_bytes = None
        self._panel(msg.role).show(view)
        if msg.state == "connected":
            self.log_event(msg.stamp, msg.role, "QMP connected", "good")
        elif msg.state == "lost" and before != "lost":
            self.log_event(msg.stamp, msg.role, "connection lost: %s" % msg.error, "error")

    @_ui_gone_ok
    def on_node_status(self, msg: NodeStatus):
        view = self.views[msg.role]
        before = view.failover
        view.apply(msg.fields)
        self._panel(msg.role).show(view)
        after = view.failover
        if before not in ("?", after) and "failover" in msg.fields:
            self.log_event(msg.stamp, msg.role, "failover state: %s -> %s" % (before, after),
                           "good" if after == "completed" else "warn")

    @_ui_gone_ok
    def on_node_event(self, msg: NodeEvent):
        if msg.name == "COLO_CHECKPOINT":
            if self.history.add(CheckpointRecord.from_event(msg.data, msg.stamp)):
                self._main(CheckpointTimeline).show(self.history)
            return
        data = msg.data or {}
        if msg.name == "MIGRATION":
            text, severity = "MIGRATION %s" % data.get("status"), \
                "error" if data.get("status") == "failed" else "info"
        elif msg.name == "COLO_EXIT":
            text = "COLO_EXIT mode %s, reason %s" % (data.get("mode"), data.get("reason"))
            severity = "error" if data.get("reason") == "error" else "warn"
        elif msg.name == "COLO_NET_TAKEOVER":
            text = "takeover network: %d frames replayed into %s%s%s" % (
                data.get("replayed", 0), data.get("tap"),
                ", replay skipped: %s" % data["replay-skipped"] if data.get("replay-skipped") else "",
                "; ERROR %s" % data["error"] if data.get("error") else "")
            severity = "error" if data.get("error") else "good"
        elif msg.name in ("STOP", "RESUME"):
            text, severity = msg.name, "warn" if msg.name == "STOP" else "info"
        else:
            text, severity = "%s %s" % (msg.name, data), "warn"
        self.log_event(msg.stamp, msg.role, text, severity)

    @_ui_gone_ok
    def on_settings_read(self, msg: SettingsRead):
        if msg.role == "primary":
            self._main(SettingsPanel).show(msg.capabilities, msg.parameters)

    @_ui_gone_ok
    def on_command_done(self, msg: CommandDone):
        self.log_event(msg.stamp, msg.role, msg.text, "good" if msg.ok else "error")
        if not msg.ok:
            self.notify(msg.text, severity="error", timeout=6)

    @_ui_gone_ok
    def on_demo_state(self, msg: DemoState):
        self.log_event(msg.stamp, "demo", msg.text, "info" if msg.ok else "error")
        if not msg.ok:
            self.notify(msg.text, severity="error", timeout=10)

    # ---- --demo -----------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="demo")
    def start_demo(self):
        self.post_message(DemoState("starting a protected pair in %s" % self.demo.workdir))
        try:
            took = self.demo.start()
        except Exception as exc:  # noqa: BLE001 - shown to the operator, nodes stopped on quit
            self.post_message(DemoState("demo failed: %s" % exc, ok=False))
            return
        pids = ", ".join("%s pid %d" % kv for kv in self.demo.pids().items())
        self.post_message(DemoState("pair protected in %.1f s (%s); client load running"
                                    % (took, pids)))

    # ---- operator commands --------------------------------------------------------------

    @work(group="commands")
    async def send_command(self, role, command, arguments=None, done_text=None):
        """Run one QMP command on a node in a worker; the result comes back as CommandDone."""
        watcher = self.watchers.get(role)
        try:
            if watcher is None:
                raise LinkLost("%s is not watched" % role)
            await watcher.execute(command, arguments)
        except (CommandFailed, LinkLost, OSError) as exc:
            self.post_message(CommandDone(role, command, False, "%s failed: %s" % (command, exc),
                                          time.time()))
            return
        self.post_message(CommandDone(role, command, True, done_text or "%s: ok" % command,
                                      time.time()))
        if command == "x-colo-lost-heartbeat":
            for w in self.watchers.values():
                w.poll_now(follow_failover=True)
        elif command == "migrate-set-parameters":
            try:
                await watcher.read_settings()
            except (CommandFailed, LinkLost, OSError):
                pass
        else:
            watcher.poll_now()

    def action_failover(self):
        def chosen(side):
            if side is None:
                return
            self.send_command(side, "x-colo-lost-heartbeat",
                              done_text="failover requested: %s takes over" % side
                              if side == "secondary" else "failover requested: primary serves alone")
        self.push_screen(FailoverScreen(self.views["primary"], self.views["secondary"]), chosen)

    def action_pause(self):
        running = self.views["primary"].vm_status == "running"
        self.send_command("primary", "stop" if running else "cont",
                          done_text="primary guest %s" % ("paused" if running else "resumed"))

    def action_delay(self):
        current = self._main(SettingsPanel).parameters.get("x-checkpoint-delay")

        def chosen(value):
            if value is not None:
                self.send_command("primary", "migrate-set-parameters",
                                  {"x-checkpoint-delay": value},
                                  done_text="x-checkpoint-delay set to %d ms" % value)
        self.push_screen(DelayScreen(current), chosen)

    @work(group="commands")
    async def action_protect(self):
        """r: the node that serves alone (under --arbiter) protects itself onto the
        standby shown first."""
        serving = next((role for role, v in self.views.items() if v.arbiter_role == "serving"),
                       None)
        if serving is None:
            self.notify("no watched node serves under an arbiter (--arbiter): nothing to "
                        "re-protect", severity="warning", timeout=6)
            return
        standbys, error = [], None
        try:
            standbys = await self.watchers[serving].execute("query-colo-standbys")
        except (CommandFailed, LinkLost, OSError) as exc:
            error = "cannot list the standbys: %s" % exc

        def chosen(standby_id):
            if standby_id is not None:
                self.send_command(serving, "x-colo-protect", {"standby": standby_id},
                                  done_text="protecting the %s onto a standby" % serving)
        self.push_screen(ProtectScreen(serving, standbys, error), chosen)

    def action_help(self):
        self.push_screen(HelpScreen())


def create_app(primary=None, secondary=None, demo=False, watch=True, opener=None):
    """The console: watch `primary`/`secondary` QMP addresses, or start a --demo pair."""
    pair = None
    addresses = {}
    if demo:
        from colocore_tui.demo import DemoPair
        pair = DemoPair()
        addresses = pair.addresses
    if primary:
        addresses["primary"] = primary
    if secondary:
        addresses["secondary"] = secondary
    return ColocoreConsole(addresses, demo=pair, watch=watch, opener=opener)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="colocore-tui", description="Watch a COLO-protected colocore pair over QMP.")
    parser.add_argument("--primary", metavar="ADDRESS",
                        help="QMP of the primary: unix:PATH or tcp:HOST:PORT")
    parser.add_argument("--secondary", metavar="ADDRESS", help="QMP of the secondary")
    parser.add_argument("--demo", action="store_true",
                        help="start a local protected pair with a client load and watch it "
                             "(stopped again on quit)")
    args = parser.parse_args(argv)
    if not args.demo and not (args.primary or args.secondary):
        parser.error("give --primary/--secondary QMP addresses, or --demo")
    for address in (args.primary, args.secondary):
        if address and address.partition(":")[0] not in ("unix", "tcp"):
            parser.error("%r: a QMP address is unix:PATH or tcp:HOST:PORT" % address)
    app = create_app(args.primary, args.secondary, demo=args.demo)
    try:
        app.run()
    finally:
        if app.demo is not None:
            app.demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
