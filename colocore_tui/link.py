"""The console's QMP link: the few things it needs from a QMP connection.

    link = await open_link("unix:/path/p-qmp.sock")      # connect + capabilities
    await link.execute("query-status")                   # -> the "return" value
    name, data, stamp = await link.next_event()
    await link.close()

It is a thin wrapper over colocore.clients.qmp.AsyncQmpClient; tests
can hand the watcher any other opener with the same shape.
"""
import asyncio

CONNECT_TIMEOUT_S = 3.0
COMMAND_TIMEOUT_S = 10.0
EVENT_POLL_S = 0.5


class LinkLost(ConnectionError):
    """The node is not reachable (any more)."""


class CommandFailed(Exception):
    """The node answered a command with a QMP error."""

    def __init__(self, error_class, desc):
        super().__init__("%s: %s" % (error_class, desc))
        self.error_class = error_class
        self.desc = desc


class QmpLink:
    def __init__(self, client, address):
        self.client = client          # colocore.clients.qmp.AsyncQmpClient (routes replies by id)
        self.address = address

    async def execute(self, command, arguments=None):
        from colocore.errors import ColocoreError
        from colocore.clients.qmp import QmpError
        try:
            return await self.client.execute(command, arguments, timeout=COMMAND_TIMEOUT_S)
        except QmpError as exc:
            raise CommandFailed(exc.error_class, exc.desc) from None
        except (ColocoreError, OSError) as exc:
            # QmpDisconnected, or no answer in time: either way the node is not with us
            raise LinkLost("%s: %s" % (self.address, exc)) from None

    async def next_event(self):
        """The next event; LinkLost once the connection is gone (checked every EVENT_POLL_S)."""
        while True:
            try:
                event = await wait_for(self.client.events.get(), EVENT_POLL_S)
            except asyncio.TimeoutError:
                if not self.client.connected:
                    raise LinkLost("%s: connection closed" % self.address) from None
                continue
            return _event_tuple(event)

    async def close(self):
        try:
            await self.client.close()
        except Exception:  # noqa: BLE001 - closing a dead link must not fail
            pass


async def wait_for(aw, timeout):
    """asyncio.wait_for that never swallows a cancellation of the caller: on Python 3.11
    it may return the result instead of raising when the cancel and the result arrive
    together, and a polling loop would then run forever (gh-86296)."""
    result = await asyncio.wait_for(aw, timeout)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()
    return result


def _event_tuple(event):
    """(name, data, stamp) from a QMP event dict."""
    ts = event.get("timestamp") or {}
    stamp = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6 if ts else None
    return event.get("event", "?"), event.get("data") or {}, stamp


async def open_link(address):
    from colocore.errors import ColocoreError
    from colocore.clients.qmp import AsyncQmpClient
    client = AsyncQmpClient(timeout=CONNECT_TIMEOUT_S)
    try:
        await client.connect(address)
    except (ColocoreError, OSError, ValueError) as exc:
        await client.close()
        raise LinkLost(str(exc)) from None
    return QmpLink(client, address)
