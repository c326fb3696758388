"""Small QMP clients for colocore's own tools (script mode, the console).

    QmpClient        blocking; a reader thread routes replies by id and queues events
    AsyncQmpClient   asyncio; a reader task does the same

Both: `connect(address)` (unix:PATH or tcp:HOST:PORT; reads the greeting and negotiates),
`execute(cmd, args)` -> the return value, or raises QmpError(desc, error_class);
events go to `on_event(event_dict)` if set, and into a queue (`get_event`). After the node
goes away, `connected` is False and `connect()` may simply be called again.
"""
import asyncio
import itertools
import json
import queue
import socket
import threading

from colocore.clients import connect as _connect_socket
from colocore.control.chardev import parse_chardev
from colocore.errors import ColocoreError, QmpError

MAX_EVENTS = 10000       # queued events kept when nobody reads them (oldest dropped)


class QmpDisconnected(ColocoreError):
    pass


def _split_lines(buf):
    """Pop complete lines (QMP servers end each message with a newline)."""
    lines = []
    while True:
        i = buf.find(b"\n")
        if i < 0:
            return lines
        line = bytes(buf[:i]).strip()
        del buf[:i + 1]
        if line:
            lines.append(line)


def _request(ids, prefix, cmd, args):
    """(id, wire bytes) of one `execute`."""
    msg_id = "%s%d" % (prefix, next(ids))
    msg = {"execute": cmd, "id": msg_id}
    if args:
        msg["arguments"] = args
    return msg_id, json.dumps(msg).encode() + b"\n"


class QmpClient:
    """Blocking QMP client."""

    def __init__(self, address=None, timeout=10.0, on_event=None):
        self.timeout = timeout
        self.on_event = on_event
        self.events = queue.Queue()
        self.greeting = None
        self.sock = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._replies = {}
        self._reader = None
        self._alive = False
        if address is not None:
            self.connect(address)

    @property
    def connected(self):
        return self._alive

    def connect(self, address):
        self.close()
        self.sock = _connect_socket(address, self.timeout)
        self.sock.settimeout(self.timeout)
        buf = bytearray()
        while True:
            lines = _split_lines(buf)
            if lines:
                break
            data = self.sock.recv(65536)
            if not data:
                self.sock.close()
                raise QmpDisconnected("%s closed the connection before the QMP greeting" % address)
            buf += data
        self.greeting = json.loads(lines[0])
        if "QMP" not in self.greeting:
            raise ColocoreError("%s is not a QMP server (greeting %r)" % (address, lines[0][:80]))
        self.sock.settimeout(None)
        self._alive = True
        self._replies = {}
        self._reader = threading.Thread(target=self._read_loop, args=(self.sock, buf, lines[1:]),
                                        name="qmp-client", daemon=True)
        self._reader.start()
        self.execute("qmp_capabilities")
        return self.greeting

    def _read_loop(self, sock, buf, pending):
        try:
            for line in pending:
                self._dispatch(line)
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
                for line in _split_lines(buf):
                    self._dispatch(line)
        except OSError:
            pass
        finally:
            with self._cond:
                if self.sock is sock:
                    self._alive = False
                self._cond.notify_all()

    def _dispatch(self, line):
        try:
            msg = json.loads(line)
        except ValueError:
            return
        if "event" in msg:
            if self.events.qsize() >= MAX_EVENTS:
                try:
                    self.events.get_nowait()
                except queue.Empty:
                    pass
            self.events.put(msg)
            if self.on_event is not None:
                self.on_event(msg)
            return
        with self._cond:
            self._replies[msg.get("id")] = msg
            self._cond.notify_all()

    def execute(self, cmd, args=None, timeout=None):
        if not self._alive:
            raise QmpDisconnected("not connected to a QMP server")
        msg_id, wire = _request(self._ids, "c", cmd, args)
        try:
            self.sock.sendall(wire)
        except OSError as exc:
            raise QmpDisconnected("QMP connection lost: %s" % exc) from None
        with self._cond:
            ok = self._cond.wait_for(lambda: msg_id in self._replies or not self._alive,
                                     timeout or self.timeout)
            reply = self._replies.pop(msg_id, None)
        if reply is None:
            if not ok:
                raise ColocoreError("QMP %s: no answer within %.0f s" % (cmd, timeout or self.timeout))
            raise QmpDisconnected("QMP connection lost during %s" % cmd)
        if "error" in reply:
            raise QmpError(reply["error"].get("desc", ""), reply["error"].get("class", "GenericError"))
        return reply.get("return")

    def get_event(self, timeout=None):
        """The next queued event, or None after `timeout` seconds."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self):
        sock, self.sock = self.sock, None
        self._alive = False
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(2)
        self._reader = None


class AsyncQmpClient:
    """asyncio QMP client (the console's)."""

    def __init__(self, on_event=None, timeout=10.0):
        self.on_event = on_event
        self.timeout = timeout
        self.events = asyncio.Queue(MAX_EVENTS)
        self.greeting = None
        self._reader = None
        self._writer = None
        self._task = None
        self._ids = itertools.count(1)
        self._pending = {}

    @property
    def connected(self):
        return self._task is not None and not self._task.done()

    async def connect(self, address):
        await self.close()
        spec = parse_chardev(address, "address")
        if spec.kind == "unix":
            coro = asyncio.open_unix_connection(spec.path, limit=1 << 22)
        elif spec.kind == "tcp":
            host = spec.host if spec.host != "0.0.0.0" else "127.0.0.1"
            coro = asyncio.open_connection(host, spec.port, limit=1 << 22)
        else:
            raise ColocoreError("address %r: expected unix:PATH or tcp:HOST:PORT" % address)
        try:
            self._reader, self._writer = await asyncio.wait_for(coro, self.timeout)
            line = await asyncio.wait_for(self._reader.readline(), self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            await self.close()
            raise QmpDisconnected("cannot connect to %s: %s; is the node running?"
                                  % (address, exc)) from None
        if not line:
            await self.close()
            raise QmpDisconnected("%s closed the connection before the QMP greeting" % address)
        self.greeting = json.loads(line)
        self._task = asyncio.ensure_future(self._read_loop())
        await self.execute("qmp_capabilities")
        return self.greeting

    async def _read_loop(self):
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "event" in msg:
                    if self.events.full():
                        self.events.get_nowait()
                    self.events.put_nowait(msg)
                    if self.on_event is not None:
                        self.on_event(msg)
                    continue
                fut = self._pending.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(QmpDisconnected("QMP connection lost"))
            self._pending.clear()

    async def execute(self, cmd, args=None, timeout=None):
        if not self.connected:
            raise QmpDisconnected("not connected to a QMP server")
        msg_id, wire = _request(self._ids, "a", cmd, args)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            self._writer.write(wire)
            await self._writer.drain()
            reply = await asyncio.wait_for(fut, timeout or self.timeout)
        except (OSError, ConnectionError) as exc:
            raise QmpDisconnected("QMP connection lost: %s" % exc) from None
        except asyncio.TimeoutError:
            raise ColocoreError("QMP %s: no answer within %.0f s" % (cmd, timeout or self.timeout)) from None
        finally:
            self._pending.pop(msg_id, None)
        if "error" in reply:
            raise QmpError(reply["error"].get("desc", ""), reply["error"].get("class", "GenericError"))
        return reply.get("return")

    async def close(self):
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (OSError, ConnectionError):
                pass
        if self._task is not None:
            self._task.cancel()
            # gather, not a bare await in try/except CancelledError: a cancellation of the
            # *caller* while it waits here must propagate, or the caller's task never ends
            # (asyncio.run then hangs cancelling it)
            await asyncio.gather(self._task, return_exceptions=True)
        self._reader = self._writer = self._task = None
