"""A 16550 UART at COM1 (I/O ports 0x3f8-0x3ff). No interrupts are injected.

The guests use it for boot and diagnostic messages from CPL 0. Register model: RBR/THR,
IER, IIR/FCR, LCR, MCR, LSR, MSR, SCR, and the divisor latch behind LCR.DLAB.
"""
import threading

from colocore.vm.devices import U8, check_fields

COM1 = 0x3F8
RX_MAX = 65536
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40


class Uart16550:
    def __init__(self, output):
        self.output = output          # OutputChannel
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0x08
        self.scr = 0
        self.fcr = 0
        self.dll, self.dlm = 0x0C, 0x00   # 9600 baud
        self.rx = bytearray()

    def feed(self, data):
        with self._lock:
            self.rx += data
            if len(self.rx) > RX_MAX:     # a 16550 would have overrun long ago
                del self.rx[:-RX_MAX]

    def pio_read(self, port, size):
        off = port - COM1
        dlab = self.lcr & 0x80
        if off == 0:
            if dlab:
                return self.dll
            with self._lock:
                if self.rx:
                    b = self.rx[0]
                    del self.rx[0]
                    return b
            return 0
        if off == 1:
            return self.dlm if dlab else self.ier
        if off == 2:
            return 0xC1 if self.fcr & 1 else 0x01    # no interrupt pending
        if off == 3:
            return self.lcr
        if off == 4:
            return self.mcr
        if off == 5:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        if off == 6:
            return 0xB0                                # CTS DSR DCD
        return self.scr

    def pio_write(self, port, size, value):
        off = port - COM1
        value &= 0xFF
        dlab = self.lcr & 0x80
        if off == 0:
            if dlab:
                self.dll = value
            else:
                self.output.emit(bytes((value,)))
        elif off == 1:
            if dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F
        elif off == 2:
            self.fcr = value
        elif off == 3:
            self.lcr = value
        elif off == 4:
            self.mcr = value & 0x1F
        elif off == 7:
            self.scr = value

    def save(self):
        with self._lock:
            return {"ier": self.ier, "lcr": self.lcr, "mcr": self.mcr, "scr": self.scr,
                    "fcr": self.fcr, "dll": self.dll, "dlm": self.dlm, "rx": bytes(self.rx)}

    @staticmethod
    def check(s):
        return check_fields(s, {"ier": U8, "lcr": U8, "mcr": U8, "scr": U8, "fcr": U8,
                                "dll": U8, "dlm": U8, "rx": ("bytes", RX_MAX)}, "uart")

    def load(self, s):
        with self._lock:
            for k in ("ier", "lcr", "mcr", "scr", "fcr", "dll", "dlm"):
                setattr(self, k, s[k])
            self.rx = bytearray(s["rx"])
