"""colocore's platform registers at 0xD0001000: WAIT, CLOCK, EXIT, PANIC.

WAIT is how a guest idles without burning a host core: the read delivers pending console
input and returns at once if there was some; otherwise the vCPU thread sleeps (without
the GIL) until input arrives, the node wants the vCPU (pause), or the timeout passes.
"""
import threading
import time

BASE = 0xD0001000
SIZE = 0x1000
DEFAULT_WAIT_US = 50_000


class Platform:
    def __init__(self, console, on_exit, on_panic):
        self.console = console
        self.on_exit = on_exit
        self.on_panic = on_panic
        self.wakeup = threading.Event()
        self.reset()

    def reset(self):
        self.wait_timeout_us = DEFAULT_WAIT_US
        self.clock_hi = 0
        self.clock_offset = 0     # guest clock = host CLOCK_MONOTONIC + offset

    def wake(self):
        """Input arrived or the vCPU is wanted elsewhere: end a WAIT now."""
        self.wakeup.set()

    def mmio_read(self, off, size):
        if off == 0x00:
            # clear before looking, so an input that lands in between is not missed
            self.wakeup.clear()
            n = self.console.deliver_rx()
            if n:
                return n
            self.wakeup.wait(self.wait_timeout_us / 1e6)
            return self.console.deliver_rx()
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

    def load(self, s):
        self.wait_timeout_us = int(s["wait_timeout_us"])
        self.clock_hi = int(s["clock_hi"])
        self.clock_offset = int(s["clock_ns"]) - time.monotonic_ns()
