"""The QMP server: QEMU's JSON monitor protocol on a node's `--qmp` chardev.

Wire protocol (QEMU's interop/qmp-spec): on connect the server sends a greeting
`{"QMP": {"version": ..., "capabilities": []}}`; the client must run `qmp_capabilities`
before anything else; each `{"execute": NAME, "arguments": {...}, "id": ID}` is answered in
order by `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}` with the id echoed;
events `{"event": ..., "data": ..., "timestamp": {"seconds": ..., "microseconds": ...}}`
go to every negotiated client.

Everything runs on the node's control loop. Each client is a `QmpSession`: a framer that
cuts the byte stream into JSON texts (like QEMU's json-streamer, so messages need no
newline and may span lines), a bounded request queue, and one task that runs commands one
after another. A client that floods us has its socket paused while the queue is full
(QEMU: QMP_REQ_QUEUE_LEN_MAX); a client that vanishes mid-command loses only its answer.
"""
import asyncio
import collections
import json
import logging

from colocore.control.commands import version_info
from colocore.control.jsonframer import MAX_MESSAGE, JsonFramer
from colocore.errors import ColocoreError, QmpError
from colocore.migration.params import CHOICES, PARAMETERS, TLS_PARAMETERS

log = logging.getLogger("colocore.qmp")

# Raw input held per client before its socket stops being read, framed FRAME_STEP bytes
# at a time; unfinished input of all clients together (past it, a client is dropped).
INBOX_MAX = 64 << 10
FRAME_STEP = 16 << 10
TOTAL_MAX = 16 << 20


# ---- argument checking in QEMU's words ----------------------------------------------

_TYPES = {"str": (str, "string"), "int": (int, "integer"), "bool": (bool, "boolean"),
          "list": (list, "array"), "dict": (dict, "object"),
          "strornull": ((str, type(None)), "string")}    # QEMU's StrOrNull (tls-creds)


def _check_args(args, spec):
    """spec: name -> (type name, required). QEMU's messages for wrong input."""
    for name in args:
        if name not in spec:
            raise QmpError("Parameter '%s' is unexpected" % name)
    for name, (typ, required) in spec.items():
        if name not in args:
            if required:
                raise QmpError("Parameter '%s' is missing" % name)
            continue
        py, text = _TYPES[typ]
        value = args[name]
        if not isinstance(value, py) or (py is int and isinstance(value, bool)):
            raise QmpError("Invalid parameter type for '%s', expected: %s" % (name, text))


# ---- the command table ------------------------------------------------------------------

class QmpCommands:
    """QMP's spelling of the operations (control/commands.py): argument schema in, data
    out. Handlers take (session, args) -> return value."""

    def __init__(self, ops, hmp):
        self.ops = ops
        self.hmp = hmp
        self.table = {}          # name -> (argument spec, handler)
        self._register()

    def names(self):
        return sorted(self.table)

    def command(self, name, **spec):
        def deco(fn):
            self.table[name] = (spec, fn)
            return fn
        return deco

    def _register(self):
        ops = self.ops

        @self.command("qmp_capabilities", enable=("list", False))
        def _caps(session, args):
            for cap in args.get("enable", []):
                # colocore offers no QMP capability (no out-of-band execution)
                raise QmpError("Capability '%s' not available" % cap)
            return {}

        @self.command("query-commands")
        def _commands(session, args):
            return [{"name": n} for n in self.names()]

        def plain(name, fn):
            self.command(name)(lambda session, args: _none_to_empty(fn()))

        plain("query-version", version_info)
        plain("query-status", ops.query_status)
        plain("stop", ops.stop)
        plain("cont", ops.cont)
        plain("quit", ops.quit)
        plain("query-migrate-capabilities", ops.query_migrate_capabilities)
        plain("query-migrate-parameters", ops.query_migrate_parameters)
        plain("migrate_cancel", ops.migrate_cancel)
        plain("query-migrate", ops.query_migrate)
        plain("x-colo-lost-heartbeat", ops.x_colo_lost_heartbeat)
        plain("query-colo-status", ops.query_colo_status)
        plain("announce-self", ops.announce_self)
        plain("x-query-net", ops.query_net)
        plain("query-colo-standbys", ops.query_colo_standbys)

        @self.command("x-colo-protect", standby=("str", False))
        def _protect(session, args):
            return ops.x_colo_protect(args.get("standby"))

        @self.command("migrate-set-capabilities", capabilities=("list", True))
        def _set_caps(session, args):
            wanted = []
            for item in args["capabilities"]:
                if not isinstance(item, dict):
                    raise QmpError("Invalid parameter type for 'capabilities[%d]', expected: object"
                                   % len(wanted))
                _check_args(item, {"capability": ("str", True), "state": ("bool", True)})
                if item["capability"] not in ops.settings.capabilities:
                    raise QmpError("Parameter 'capability' does not accept value '%s'"
                                   % item["capability"])
                wanted.append((item["capability"], item["state"]))
            ops.migrate_set_capabilities(wanted)
            return {}

        @self.command("migrate-set-parameters", **{n: ("int", False) for n in PARAMETERS},
                      **{n: ("str", False) for n in CHOICES},
                      **{n: ("strornull", False) for n in TLS_PARAMETERS})
        def _set_params(session, args):
            ops.migrate_set_parameters(args)
            return {}

        @self.command("migrate", uri=("str", True), blk=("bool", False), inc=("bool", False),
                      detach=("bool", False), resume=("bool", False))
        def _migrate(session, args):
            if args.get("blk") or args.get("inc"):
                raise QmpError("colocore has no block migration; blk and inc must be false")
            if args.get("resume"):
                raise QmpError("colocore has no postcopy; resume must be false")
            fut = ops.migrate(args["uri"])
            # as QEMU: the command returns at once; MIGRATION events report the outcome
            fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
            return {}

        @self.command("migrate-incoming", uri=("str", True))
        def _migrate_incoming(session, args):
            ops.migrate_incoming(args["uri"])
            return {}

        @self.command("human-monitor-command", **{"command-line": ("str", True),
                                                    "cpu-index": ("int", False)})
        async def _hmp(session, args):
            text, _ = await self.hmp.execute(args["command-line"])
            # QEMU returns HMP errors as text too, with \r\n line ends
            return (text.replace("\r\n", "\n").replace("\n", "\r\n") + "\r\n") if text else ""


def _none_to_empty(value):
    return {} if value is None else value


# ---- sessions ---------------------------------------------------------------------------

def _encode(msg):
    return (json.dumps(msg, separators=(", ", ": ")) + "\r\n").encode()


class QmpSession:
    """One client. Its input is held as raw bytes (`inbox`) and framed a slice at a time
    by the session's task, so what a client can make the node hold is bounded in bytes,
    never in a count of parsed messages: the socket stops being read while the inbox is
    over INBOX_MAX, an unfinished message may not pass MAX_MESSAGE, and all clients
    together may not hold more than TOTAL_MAX (the client that would pass it is told so
    and disconnected)."""

    def __init__(self, server, client):
        self.server = server
        self.client = client
        self.framer = JsonFramer()
        self.negotiated = False
        self.inbox = bytearray()
        self.items = collections.deque()
        self.wake = asyncio.Event()
        self.paused = False
        self.closed = False
        self.task = asyncio.ensure_future(self._run())

    @property
    def held(self):
        return len(self.inbox) + self.framer.pending

    def send(self, msg):
        if not self.closed:
            self.server.chardev.write(_encode(msg), self.client)

    def greet(self):
        self.send({"QMP": {"version": version_info(), "capabilities": []}})

    def feed(self, data):
        if self.closed:
            return
        self.inbox += data
        if self.server.held() > TOTAL_MAX:
            log.warning("QMP: clients hold more than %d bytes of unfinished input; "
                        "disconnecting the one that sent the last %d", TOTAL_MAX, len(data))
            self.send(_error(QmpError("the node's QMP input buffers are full; send complete "
                                      "messages (at most %d bytes each)" % MAX_MESSAGE)))
            self.abort()
            return
        t = getattr(self.client, "transport", None)
        if t is not None and len(self.inbox) > INBOX_MAX and not self.paused:
            # flow control: stop reading until the backlog is worked off
            self.paused = True
            t.pause_reading()
        self.wake.set()

    def _next_item(self):
        """The next framed item, framing at most FRAME_STEP more bytes; None if none."""
        while not self.items and self.inbox:
            step = bytes(self.inbox[:FRAME_STEP])
            del self.inbox[:FRAME_STEP]
            self.items.extend(self.framer.feed(step))
            if self.paused and len(self.inbox) < INBOX_MAX // 2:
                self.paused = False
                t = getattr(self.client, "transport", None)
                if t is not None and not t.is_closing():
                    t.resume_reading()
        return self.items.popleft() if self.items else None

    async def _run(self):
        burst = 0
        while not self.closed:
            item = self._next_item()
            if item is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            if self.client is not None:
                await self.client.drained()   # a client that does not read gets no more answers
            if isinstance(item, QmpError):
                self.send(_error(item))
                continue
            try:
                reply = await self.handle(item)
            except Exception as exc:  # noqa: BLE001 - one bad message never ends a session
                log.exception("QMP: handling a message failed")
                reply = _error(QmpError("internal error: %s" % exc))
            if reply is not None:
                self.send(reply)
            burst += 1
            if burst % 64 == 0:
                await asyncio.sleep(0)    # many queued messages: let the loop breathe

    async def handle(self, raw):
        try:
            msg = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return _error(QmpError("JSON parse error, invalid UTF-8 sequence in string"))
        except json.JSONDecodeError as exc:
            return _error(QmpError("JSON parse error, %s" % exc.msg))
        except RecursionError:
            # nesting the framer allows (QEMU's 1024) but Python's parser does not
            return _error(QmpError("JSON nesting depth limit exceeded"))
        if not isinstance(msg, dict):
            return _error(QmpError("QMP input must be a JSON object"))
        has_id = "id" in msg
        msg_id = msg.get("id")
        try:
            name, args = self._validate(msg)
            result = await self.server.run(self, name, args)
            reply = {"return": result}
        except QmpError as exc:
            reply = _error(exc)
        except ColocoreError as exc:
            reply = _error(QmpError(str(exc)))
        except Exception as exc:  # noqa: BLE001 - a QMP command must never kill the node
            log.exception("QMP command failed: %r", msg)
            reply = _error(QmpError("internal error: %s" % exc))
        if has_id:
            reply["id"] = msg_id
        return reply

    def _validate(self, msg):
        if "exec-oob" in msg:
            raise QmpError("QMP input member 'exec-oob' is unexpected: out-of-band "
                           "execution was not enabled")
        if "execute" not in msg:
            raise QmpError("QMP input lacks member 'execute'")
        for key in msg:
            if key not in ("execute", "arguments", "id"):
                raise QmpError("QMP input member '%s' is unexpected" % key)
        name = msg["execute"]
        if not isinstance(name, str):
            raise QmpError("QMP input member 'execute' must be a string")
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        if not self.negotiated and name != "qmp_capabilities":
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                           "CommandNotFound")
        if self.negotiated and name == "qmp_capabilities":
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        if name not in self.server.commands.table:
            raise QmpError("The command %s has not been found" % name, "CommandNotFound")
        return name, args

    def close(self):
        # A command already running finishes (its answer is dropped); the rest is not run.
        self.closed = True
        self.inbox.clear()
        self.items.clear()
        self.wake.set()

    def abort(self):
        self.close()
        t = getattr(self.client, "transport", None)
        if t is not None:
            t.abort()


def _error(exc):
    return {"error": {"class": exc.error_class, "desc": exc.desc}}


class QmpServer:
    """All QMP clients of one node's chardev, and the event fan-out to them."""

    def __init__(self, commands, chardev):
        self.chardev = chardev
        self.commands = commands
        self.sessions = {}

    async def run(self, session, name, args):
        spec, fn = self.commands.table[name]
        _check_args(args, spec)
        result = fn(session, args)
        if asyncio.iscoroutine(result):
            result = await result
        if name == "qmp_capabilities":
            session.negotiated = True
        return result

    def held(self):
        return sum(s.held for s in self.sessions.values())

    def broadcast(self, name, data, stamp):
        seconds = int(stamp)
        msg = {"event": name, "data": data,
               "timestamp": {"seconds": seconds, "microseconds": int((stamp - seconds) * 1e6)}}
        for s in list(self.sessions.values()):
            if s.negotiated:
                s.send(msg)

    def on_connect(self, client):
        s = QmpSession(self, client)
        self.sessions[id(client)] = s
        s.greet()

    def on_input(self, data, client):
        s = self.sessions.get(id(client))
        if s is not None:
            s.feed(data)

    def on_disconnect(self, client):
        s = self.sessions.pop(id(client), None)
        if s is not None:
            s.close()


def attach_qmp(commands, chardev, event_listeners):
    server = QmpServer(commands, chardev)
    event_listeners.append(server.broadcast)
    chardev.on_connect = server.on_connect
    chardev.on_input = server.on_input
    chardev.on_disconnect = server.on_disconnect
    if chardev.spec.kind == "stdio":
        server.on_connect(None)
    return server
