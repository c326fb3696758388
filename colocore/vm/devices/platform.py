"""colocore's platform registers at 0xD0001000: WAIT, CLOCK, EXIT, PANIC.

WAIT is how a guest idles without burning a host core: the read delivers pending console
input and network frames and returns at once if there were some; otherwise the vCPU
thread sleeps in poll() (without the GIL) until input arrives (the console's eventfd, a
readable tap), the node wants the vCPU (pause), or the timeout passes. Its result is the
console bytes plus the frames delivered (at most 2^31 - 1); bit 31 says the virtio-net
config changed since the last WAIT (docs/DESIGN.md).
"""
import time

from colocore_ext.virtq import Wakeup

from colocore.vm.devices import U32, U64, check_fields

BASE = 0xD0001000
SIZE = 0x1000
DEFAULT_WAIT_US = 50_000
WAIT_NET_EVENT = 0x80000000


class Platform:
    def __init__(self, console, on_exit, on_panic):
        self.console = console
        self.net = None                 # VirtioNet, when the machine has a NIC
        self.on_exit = on_exit
        self.on_panic = on_panic
        self.wakeup = Wakeup()
        self.reset()

    def reset(self):
        self.wait_timeout_us = DEFAULT_WAIT_US
        self.clock_hi = 0
        self.clock_offset = 0     # guest clock = host CLOCK_MONOTONIC + offset
        self.waits = 0            # WAIT reads (`info network` and bench net report them)

    def wake(self):
        """Input arrived or the vCPU is wanted elsewhere: end a WAIT now."""
        self.wakeup.set()

    def _deliver(self):
        n = self.console.deliver_rx()
        if self.net is not None:
            n += self.net.deliver_rx()
        return n

    def _wait(self):
        self.waits += 1
        # clear before looking, so an input that lands in between is not missed
        self.wakeup.clear()
        net = self.net
        n = self._deliver()
        if not n and not (net is not None and net.event):
            self.wakeup.wait(self.wait_timeout_us / 1e6, net.wait_fd() if net is not None else -1)
            n = self._deliver()
        n = min(n, WAIT_NET_EVENT - 1)
        if net is not None and net.take_event():
            n |= WAIT_NET_EVENT
        return n

    def mmio_read(self, off, size):
        if off == 0x00:
            return self._wait()
        if off == 0x04:
            return self.wait_timeout_us
        if off == 0x08:
            now = time.monotonic_ns() + self.clock_offset
            self.clock_hi = now >> 32
            return now & 0xFFFFFFFF
        if off == 0x0C:
            return self.clock_hi
        return 0

    def mmio_write(self, off, size, value):
        if off == 0x04:
            self.wait_timeout_us = max(100, min(int(value), 1_000_000))
        elif off == 0x10:
            self.on_exit(value)
        elif off == 0x14:
            self.on_panic(value)

    def save(self):
        # The guest clock carries on from where it was on the host that saved it.
        return {"wait_timeout_us": self.wait_timeout_us, "clock_hi": self.clock_hi,
                "clock_ns": time.monotonic_ns() + self.clock_offset}

    @staticmethod
    def check(s):
        return check_fields(s, {"wait_timeout_us": U32, "clock_hi": U32, "clock_ns": U64},
                            "platform")

    def load(self, s):
        self.wait_timeout_us = s["wait_timeout_us"]
        self.clock_hi = s["clock_hi"]
        self.clock_offset = s["clock_ns"] - time.monotonic_ns()
