"""One watcher per node: keeps a QMP link up, polls the node's state, forwards its events.

A watcher runs as an async worker on the app's loop (the QMP client is asyncio, so no call
here ever blocks the UI) and reports only through messages. A node that goes away is
reported as lost and reconnected to when it comes back.
"""
import asyncio
import os
import time

from colocore.control.hmp import format_channel
from colocore_tui.link import CommandFailed, LinkLost, open_link, wait_for
from colocore_tui.messages import LinkChanged, NodeEvent, NodeStatus, SettingsRead
from colocore_tui.model import arbiter_summary, causes_summary, net_summary

POLL_S = 0.5              # status poll period
FAST_POLL_S = 0.1         # while a failover is being followed
SETTINGS_EVERY = 4        # primary: re-read capabilities/parameters every N polls
RETRY_S = (0.2, 0.5, 1.0, 1.0, 2.0)   # reconnect back-off
EVENTS = ("STOP", "RESUME", "MIGRATION", "COLO_EXIT", "COLO_CHECKPOINT", "SHUTDOWN",
          "COLO_VERIFY_MISMATCH", "COLO_NET_TAKEOVER")

def colo_fields(status):
    """query-colo-status data -> NodeView fields."""
    peer = status.get("peer", "?")
    if status.get("peer-error"):
        peer += " (%s)" % status["peer-error"]
    fields = {"colo_mode": status.get("mode", "?"), "last_mode": status.get("last-mode", "?"),
              "reason": status.get("reason", "?"), "failover": status.get("failover-state", "?"),
              "peer": peer, "checkpoints": status.get("checkpoints", 0),
              "checkpoint_mode": status.get("checkpoint-mode", ""),
              "causes": causes_summary(status.get("checkpoint-causes"))}
    if status.get("net"):
        fields["network"] = net_summary(status["net"])
    if "arbiter" in status:
        fields["arbiter"] = arbiter_summary(status["arbiter"])
        fields["arbiter_role"] = status["arbiter"].get("role") or "none"
    return fields


def find_local_pid(address):
    """The pid of the local colocore process serving QMP at `address`, or None.

    Matched on the `--qmp` argument of the process's command line, so it works for unix
    sockets and loopback tcp addresses; nodes on other hosts simply have no pid.
    """
    import psutil
    kind, _, rest = address.partition(":")
    if kind == "unix":
        needle = os.path.realpath(rest.split(",")[0])
        match = lambda arg: arg.startswith("unix:") and \
            os.path.realpath(arg[5:].split(",")[0]) == needle
    elif kind == "tcp":
        host, _, port = rest.split(",")[0].rpartition(":")
        if host not in ("127.0.0.1", "localhost", "::1", "[::1]", "0.0.0.0", ""):
            return None
        match = lambda arg: arg.startswith("tcp:") and arg.split(",")[0].rpartition(":")[2] == port
    else:
        return None
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        for i, arg in enumerate(cmd[:-1]):
            if arg == "--qmp" and match(cmd[i + 1]):
                return proc.info["pid"]
    return None


class ProcessProbe:
    """CPU and RSS of a local node process (psutil)."""

    def __init__(self, pid):
        import psutil
        self.pid = pid
        self.proc = psutil.Process(pid)
        self.proc.cpu_percent(None)          # the first call only starts the measurement

    def sample(self):
        import psutil
        try:
            with self.proc.oneshot():
                return {"pid": self.pid, "cpu_percent": self.proc.cpu_percent(None),
                        "rss_bytes": self.proc.memory_info().rss}
        except psutil.Error:
            return {"cpu_percent": None, "rss_bytes": None}


class NodeWatcher:
    def __init__(self, role, address, post, pid=None, opener=open_link):
        self.role = role
        self.address = address
        self.post = post
        self.pid = pid                # given for nodes the console started itself
        self.opener = opener
        self.link = None
        self.follow_failover = False
        self._wake = asyncio.Event()

    # ---- commands (called from the app's command workers) --------------------------

    async def execute(self, command, arguments=None):
        link = self.link
        if link is None:
            raise LinkLost("%s (%s) is not connected" % (self.role, self.address))
        return await link.execute(command, arguments)

    def poll_now(self, follow_failover=False):
        if follow_failover:
            self.follow_failover = True
        self._wake.set()

    # ---- the loop ----------------------------------------------------------------------

    async def run(self):
        attempt = 0
        probe = None
        while True:
            try:
                link = await self.opener(self.address)
            except (OSError, LinkLost, CommandFailed, asyncio.TimeoutError) as exc:
                state = "connecting" if attempt == 0 else "lost"
                if attempt in (0, 1):
                    self.post(LinkChanged(self.role, state, str(exc) or type(exc).__name__))
                await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
                attempt += 1
                continue
            self.link = link
            attempt = 0
            self.post(LinkChanged(self.role, "connected"))
            events = asyncio.ensure_future(self._pump_events(link))
            try:
                if probe is None or not probe.proc.is_running():
                    probe = await self._probe()
                await self._poll_loop(link, probe, events)
                error = "connection closed"
            except (LinkLost, OSError, asyncio.TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
            finally:
                self.link = None
                events.cancel()
                await link.close()
            self.post(LinkChanged(self.role, "lost", error))
            probe = None
            attempt = 1

    async def _probe(self):
        try:
            pid = self.pid or await asyncio.to_thread(find_local_pid, self.address)
            return ProcessProbe(pid) if pid else None
        except Exception:  # noqa: BLE001 - process figures are a nicety, never fatal
            return None

    async def _poll_loop(self, link, probe, events):
        n = 0
        while not events.done():
            fields = await self._status(link)
            if probe is not None:
                fields.update(probe.sample())
            self.post(NodeStatus(self.role, fields))
            if self.role == "primary" and n % SETTINGS_EVERY == 0:
                await self.read_settings(link)
            if fields.get("failover") == "completed":
                self.follow_failover = False
            n += 1
            self._wake.clear()
            try:
                await wait_for(self._wake.wait(),
                                       FAST_POLL_S if self.follow_failover else POLL_S)
            except asyncio.TimeoutError:
                pass
        exc = events.exception()
        if exc is not None:
            raise exc

    async def _status(self, link):
        fields = {}
        st = await link.execute("query-status")
        fields["vm_status"] = st.get("status", "?")
        mig = await link.execute("query-migrate")
        fields["migration"] = mig.get("status", "none")
        if "x-channel" in mig:
            fields["channel"] = format_channel(mig["x-channel"])
        try:
            fields.update(colo_fields(await link.execute("query-colo-status")))
        except CommandFailed:
            pass
        return fields

    async def read_settings(self, link=None):
        link = link or self.link
        if link is None:
            return
        caps = await link.execute("query-migrate-capabilities")
        params = await link.execute("query-migrate-parameters")
        self.post(SettingsRead(self.role, {c["capability"]: bool(c["state"]) for c in caps},
                                    dict(params)))

    async def _pump_events(self, link):
        while True:
            name, data, stamp = await link.next_event()
            if name in EVENTS:
                self.post(NodeEvent(self.role, name, data, stamp or time.time()))
                if name in ("STOP", "RESUME", "MIGRATION", "COLO_EXIT", "COLO_NET_TAKEOVER"):
                    self._wake.set()
