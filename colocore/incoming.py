"""The destination side: `--incoming tcp:HOST:PORT`.

The listener is bound at start-up (so a busy port is a start-up error). The incoming
thread accepts the primary, loads the initial live migration straight into guest RAM
(the guest has never run here, so there is nothing to protect yet), then either starts
the guest (plain migration) or enters COLO incoming mode and runs the secondary loop.
An initial migration that breaks half-way is discarded (RAM zeroed again) and the node
listens for the next attempt.
"""
import json
import logging
import threading

from . import cpustate, memory
from .errors import ColocoreError, StreamError
from .machine import decode_devices
from .stream import Section
from .transport import Listener, Msg, PeerLost

log = logging.getLogger("colocore.incoming")

INITIAL_TIMEOUT = 60.0


class Incoming:
    def __init__(self, node, uri):
        self.node = node
        self.uri = uri
        self.listener = Listener(uri)
        self.thread = None
        self.error = None

    def start(self):
        self.thread = threading.Thread(target=self._main, name="incoming", daemon=True)
        self.thread.start()
        self.node.colo.incoming_thread = self.thread

    def _main(self):
        node = self.node
        while not node.quitting:
            try:
                ch = self.listener.accept()
            except OSError:
                return
            log.info("incoming migration from %s", ch.peer)
            node.migration_in_status("active")
            try:
                colo = self._initial(ch)
            except (PeerLost, StreamError, ColocoreError, OSError) as exc:
                self.error = str(exc)
                log.error("incoming migration failed: %s; waiting for another attempt", exc)
                ch.close()
                self._scrub()
                node.migration_in_status("failed")
                continue
            self.listener.close()
            if not colo:
                ch.close()
                node.loop.call_soon_threadsafe(node.incoming_finished)
                return
            node.colo.run_secondary(ch)
            return

    def _scrub(self):
        m = self.node.machine
        memory.apply_zero(m.memory.ram, m.memory.all_pages())

    def _initial(self, ch):
        node, m = self.node, self.node.machine
        ch.set_timeout(INITIAL_TIMEOUT)
        ch.reader.read_header()
        kind, payload = ch.reader.read_section()
        if kind != Section.MACHINE:
            raise StreamError("the migration stream does not start with a MACHINE section")
        try:
            info = json.loads(payload)
            mem_size = int(info["mem_size"])
        except (ValueError, KeyError, TypeError):
            raise StreamError("MACHINE section is not valid") from None
        if mem_size != m.mem_size:
            reason = ("the secondary has %d MiB of guest memory, the primary's guest %d MiB; "
                      "start the secondary with -m %dM" % (m.mem_size >> 20, mem_size >> 20, mem_size >> 20))
            ch.shut(reason)
            raise ColocoreError(reason)
        colo = bool(info.get("x-colo"))
        if colo and not node.settings.colo_supported:
            reason = "COLO is not supported on the secondary's host"
            ch.shut(reason)
            raise ColocoreError(reason)
        if colo:
            node.settings.capabilities["x-colo"] = True   # learnt from the stream
        npages = m.memory.npages
        ram = m.memory.ram
        cpu = devices = None
        while True:
            kind, payload = ch.reader.read_section()
            if kind == Section.END:
                break
            if kind == Section.RAM:
                pfns, data = memory.decode_ram(payload, npages)
                memory.apply_pages(ram, pfns, data)
            elif kind == Section.RAM_ZERO:
                memory.apply_zero(ram, memory.decode_zero(payload, npages))
            elif kind == Section.CPU:
                cpu = cpustate.decode(payload)
            elif kind == Section.DEVICES:
                devices = decode_devices(payload)
            else:
                raise StreamError("unexpected %s section in a live migration" % kind.name)
        if cpu is None or devices is None:
            raise StreamError("the migration stream ended without CPU and DEVICES state")
        m.check_saved_state(cpu, devices, "the migration stream")
        m.vcpu.set_state(cpu)
        m.load_device_states(devices)
        m.kernel, m.append = info.get("kernel"), info.get("append", "")
        if colo:
            # the SVM does not run in periodic mode; its output is held like the primary's
            m.console_out.hold = True
            m.serial_out.hold = True
            m.set_runstate("colo")
            node.migration_in_status("colo")
            log.info("entering COLO incoming mode (secondary)")
        else:
            ch.send_msg(Msg.LOADED)
            node.migration_in_status("completed")
        return colo

    def close(self):
        self.listener.close()
