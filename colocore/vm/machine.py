"""The machine: one KVM VM, one vCPU thread, the devices, and the run state.

Threads: the vCPU thread runs `Vcpu.run_loop` (KVM_RUN without the GIL) and emulates
devices synchronously on its exits; everyone else asks it to pause through `pause()`,
which kicks the vCPU out of KVM_RUN (signal + immediate_exit) and wakes a guest idling
in WAIT, then waits until the thread has parked. A parked vCPU means quiescent devices
and a guest RAM nobody writes: that is when state is captured or loaded.

Long because the run states, the pause protocol, state capture and the output-commit calls
are one object's contract: every thread that pauses, captures or releases goes through it.
"""
import logging
import os
import threading
import time

from colocore_ext import kvm

from colocore.errors import ColocoreError, StreamError
from colocore.vm import loader
from colocore.vm.devices.output import OutputChannel
from colocore.vm.devices.platform import BASE as PLATFORM_BASE, SIZE as PLATFORM_SIZE, Platform
from colocore.vm.devices.uart import COM1, Uart16550
from colocore.vm.devices.virtio_console import BASE as VIRTIO_BASE, SIZE as VIRTIO_SIZE, VirtioConsole
from colocore.vm.devices.virtio_net import BASE as NET_BASE, SIZE as NET_SIZE, VirtioNet
from colocore.vm.memory import GuestMemory

log = logging.getLogger("colocore.machine")

MAX_MEM = 3 << 30
PAUSE_TIMEOUT = 2.0
SPIN_PARK = 0.002

# QEMU's run states, and which may follow which. One helper changes the state.
RUNSTATES = {
    "prelaunch": {"running", "inmigrate", "paused", "shutdown"},
    "inmigrate": {"running", "paused", "colo", "prelaunch", "shutdown"},
    "running": {"paused", "postmigrate", "shutdown", "guest-panicked", "internal-error",
                "finish-migrate"},
    "finish-migrate": {"postmigrate", "running", "paused", "colo"},
    "paused": {"running", "postmigrate", "shutdown", "finish-migrate"},
    "postmigrate": {"running", "paused", "shutdown", "finish-migrate"},   # QEMU: migrate again
    "colo": {"running", "shutdown", "paused"},
    "guest-panicked": {"shutdown", "paused"},
    "internal-error": {"shutdown", "paused"},
    "shutdown": set(),
}


class Bus:
    """Routes the vCPU's port and MMIO accesses to devices (called by Cython, GIL held)."""

    def __init__(self, uart, console, platform):
        self.uart, self.console, self.platform = uart, console, platform
        self.net = None

    def pio_read(self, port, size):
        if COM1 <= port < COM1 + 8:
            return self.uart.pio_read(port, size)
        return 0xFFFFFFFF & ((1 << (8 * size)) - 1)

    def pio_write(self, port, size, value):
        if COM1 <= port < COM1 + 8:
            self.uart.pio_write(port, size, value)

    def mmio_read(self, addr, size):
        if VIRTIO_BASE <= addr < VIRTIO_BASE + VIRTIO_SIZE:
            return self.console.mmio_read(addr - VIRTIO_BASE, size)
        if NET_BASE <= addr < NET_BASE + NET_SIZE and self.net is not None:
            return self.net.mmio_read(addr - NET_BASE, size)
        if PLATFORM_BASE <= addr < PLATFORM_BASE + PLATFORM_SIZE:
            return self.platform.mmio_read(addr - PLATFORM_BASE, size)
        return 0

    def mmio_write(self, addr, size, value):
        if VIRTIO_BASE <= addr < VIRTIO_BASE + VIRTIO_SIZE:
            self.console.mmio_write(addr - VIRTIO_BASE, size, value)
            if addr - VIRTIO_BASE == 0x050 and self.net is not None:
                self.net.deliver_rx()     # receive buffers are filled at any notify
        elif NET_BASE <= addr < NET_BASE + NET_SIZE and self.net is not None:
            self.net.mmio_write(addr - NET_BASE, size, value)
        elif PLATFORM_BASE <= addr < PLATFORM_BASE + PLATFORM_SIZE:
            self.platform.mmio_write(addr - PLATFORM_BASE, size, value)


class Machine:
    def __init__(self, mem_size, name="colocore", on_event=None):
        if mem_size > MAX_MEM:
            raise ColocoreError("-m %dM is more than colocore's %d MiB (the MMIO window starts "
                                "at 3 GiB)" % (mem_size >> 20, MAX_MEM >> 20))
        if mem_size < (16 << 20):
            raise ColocoreError("-m %dM is too small; give the guest at least 16M" % (mem_size >> 20))
        self.name = name
        self.mem_size = mem_size
        self.on_event = on_event or (lambda name, data: None)
        # COLOCORE_KVM_DEVICE exists for tests of the "no KVM here" message
        self.vm = kvm.Vm(mem_size, kvm_path=os.environ.get("COLOCORE_KVM_DEVICE", "/dev/kvm"))
        self.memory = GuestMemory(self.vm)
        self.vcpu = kvm.Vcpu(self.vm)
        self.console_out = OutputChannel("console", lambda data: None)
        self.serial_out = OutputChannel("serial", lambda data: None)
        self.uart = Uart16550(self.serial_out)
        self.console = VirtioConsole(self.memory.ram, self.memory.mark_dirty, self.console_out,
                                     dirty_log=self.memory.dirty)
        self.nic = None
        self.platform = Platform(self.console, self._guest_exit, self._guest_panic)
        self.bus = Bus(self.uart, self.console, self.platform)
        self.runstate = "prelaunch"
        self.stop_reason = None           # why the guest stopped by itself, if it did
        self._state_lock = threading.Lock()
        self._cond = threading.Condition()
        self._want_run = False
        self._parked = True
        self._quit = False
        self._thread = None
        self.kernel = None
        self.append = ""
        self._scratch = None          # a vCPU to try saved states on (check_state)

    # ---- run state -------------------------------------------------------------

    def set_runstate(self, new):
        """The only place the run state changes; refuses transitions QEMU would refuse."""
        with self._state_lock:
            old = self.runstate
            if old == new:
                return old
            if new not in RUNSTATES.get(old, ()):
                raise ColocoreError("cannot switch run state from %s to %s" % (old, new))
            self.runstate = new
        return old

    def attach_nic(self, mac, backend):
        """Plug the virtio-net card (before the vCPU starts); backend: TapBackend or None."""
        self.nic = VirtioNet(self.memory.ram, self.memory.dirty, mac=mac, backend=backend)
        self.nic.on_event = self.platform.wake
        self.bus.net = self.nic
        self.platform.net = self.nic
        return self.nic

    # ---- boot ------------------------------------------------------------------

    def boot(self, kernel, append=""):
        path = loader.resolve_kernel(kernel)
        image = loader.parse(path)
        mode = loader.load(image, self.memory.ram, self.mem_size, append, self.vcpu)
        self.kernel, self.append = path, append
        log.info("%s: loaded %s (%s entry), %d MiB", self.name, path, mode, self.mem_size >> 20)

    # ---- the vCPU thread ---------------------------------------------------------

    def start_thread(self):
        self._thread = threading.Thread(target=self._vcpu_main, name="vcpu0", daemon=True)
        self._thread.start()

    def _vcpu_main(self):
        while True:
            with self._cond:
                while not self._want_run and not self._quit:
                    self._parked = True
                    self._cond.notify_all()
                    self._cond.wait()
                if self._quit:
                    self._parked = True
                    self._cond.notify_all()
                    return
                self._parked = False
            try:
                why = self.vcpu.run_loop(self.bus)
            except Exception as exc:    # noqa: BLE001 - a dead vCPU must be reported, not hang
                log.exception("%s: vCPU failed", self.name)
                why = "internal-error: %s" % exc
            if why == "kicked":
                continue
            self._guest_stopped(why)

    def _guest_stopped(self, why):
        """The guest stopped by itself (halt, triple fault, entry failure)."""
        with self._cond:
            self._want_run = False
        if why == "shutdown":
            msg, state = "guest triple-faulted (KVM_EXIT_SHUTDOWN)", "guest-panicked"
        elif why == "halt":
            msg, state = "guest halted for good (HLT with interrupts off)", "guest-panicked"
        else:
            msg, state = "vCPU stopped: %s" % why, "internal-error"
        self._report_stop(msg, state)

    def _report_stop(self, msg, state):
        try:
            rip = self.vcpu.rip()
            msg += " at RIP=0x%x" % rip
        except OSError:
            pass
        self.stop_reason = msg
        log.error("%s: %s", self.name, msg)
        try:
            self.set_runstate(state)
        except ColocoreError:
            pass
        self.on_event("GUEST_PANICKED" if state == "guest-panicked" else "STOP",
                      {"action": "pause", "reason": msg})

    def _guest_exit(self, status):
        self.stop_reason = "guest exited with status %d" % status
        log.info("%s: %s", self.name, self.stop_reason)
        with self._cond:
            self._want_run = False
        self.vcpu.kick()
        try:
            self.set_runstate("shutdown")
        except ColocoreError:
            pass
        self.on_event("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})

    def _guest_panic(self, code):
        with self._cond:
            self._want_run = False
        self.vcpu.kick()
        self._report_stop("guest reported a panic (code %d)" % code, "guest-panicked")

    # ---- pause / resume ----------------------------------------------------------

    def resume(self, state="running"):
        if self.runstate in ("guest-panicked", "internal-error", "shutdown"):
            raise ColocoreError("the guest cannot run: %s" % (self.stop_reason or self.runstate))
        self.set_runstate(state)
        with self._cond:
            self._want_run = True
            self._cond.notify_all()
        self.on_event("RESUME", {})

    def pause(self, state="paused", event=True):
        """Stop the vCPU and wait until it is parked; returns the seconds it took."""
        t0 = time.perf_counter()
        with self._cond:
            self._want_run = False
            self.vcpu.kick()
            self.platform.wake()
            deadline = t0 + PAUSE_TIMEOUT
            while not self._parked:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise ColocoreError("vCPU did not stop within %.1f s" % PAUSE_TIMEOUT)
                self._cond.wait(left)
        took = time.perf_counter() - t0
        # "paused" only replaces "running"; the other states (finish-migrate, ...) always apply
        if self.runstate != state and (self.runstate == "running" or state != "paused"):
            self.set_runstate(state)
        if event:
            self.on_event("STOP", {})
        return took

    def park_quietly(self):
        """Pause for a checkpoint: no run state change, no events, shortest path.

        Returns whether the vCPU was meant to run; pass it to unpark_quietly, so that a
        guest the operator stopped stays stopped across checkpoints."""
        with self._cond:
            was_running = self._want_run
            self._want_run = False
            self.vcpu.kick()
            self.platform.wake()
        # The vCPU usually parks within a few hundred microseconds: poll for that long
        # (each sleep(0) hands the GIL to the vCPU thread) before paying for a condition
        # wake-up, which costs ~70 us more on this host.
        spin_until = time.perf_counter() + SPIN_PARK
        while not self._parked and time.perf_counter() < spin_until:
            time.sleep(0)
        with self._cond:
            while not self._parked:
                if not self._cond.wait(PAUSE_TIMEOUT):
                    self._want_run = was_running
                    raise ColocoreError("vCPU did not stop within %.1f s" % PAUSE_TIMEOUT)
        return was_running

    def unpark_quietly(self, was_running):
        if not was_running:
            return
        with self._cond:
            self._want_run = True
            self._cond.notify_all()

    # ---- state capture ---------------------------------------------------------

    def _devices(self):
        """Every device with saved state, by the name its state has in DEVICES."""
        devices = {"uart": self.uart, "virtio-console": self.console,
                   "platform": self.platform, "console-out": self.console_out,
                   "serial-out": self.serial_out}
        if self.nic is not None:
            devices["virtio-net"] = self.nic
        return devices

    def device_states(self, pause=False):
        """pause=True (a checkpoint's pause path): the NIC's held frames are counted, not
        copied; complete_device_states() copies them once the guest runs again."""
        return {name: dev.save(pause) if name == "virtio-net" else dev.save()
                for name, dev in self._devices().items()}

    def complete_device_states(self, states):
        net = states.get("virtio-net")
        if net is not None and not isinstance(net["out"], dict):
            net["out"] = net["out"].resolve()

    def check_state(self, cpu, devices, what):
        """Check a saved vCPU and device state against this machine before any of it is
        applied; return the devices' checked states (what `load_devices` takes). Raises
        StreamError; changes nothing.

        The vCPU state is tried on a scratch vCPU of a scratch VM: KVM refuses some states
        (a bad CR0/EFER pair, an MSR this host lacks) only when they are set, and a unit
        must be refused before the secondary answers vmstate-received for it, not
        half-way through its apply."""
        try:
            self.vcpu.check_state(cpu)
            self._scratch_vcpu().set_state(cpu)
        except (ValueError, OSError) as exc:
            raise StreamError("%s: the vCPU state does not load on this host: %s"
                              % (what, exc)) from None
        if not isinstance(devices, dict):
            raise StreamError("%s: the device state is not an object" % what)
        known = self._devices()
        if "virtio-net" in devices and self.nic is None:
            raise StreamError("%s: the guest has a network card (virtio-net); start this node "
                              "with --nic tap,ifname=NAME" % what)
        extra = set(devices) - set(known)
        if extra:
            raise StreamError("%s: state for unknown device(s) %s"
                              % (what, ", ".join(sorted(map(str, extra)))))
        checked = {}
        for name, dev in known.items():
            if name == "virtio-net" and name not in devices:
                continue        # a guest saved without a NIC never drove this one
            if name not in devices:
                raise StreamError("%s: the device state lacks %r" % (what, name))
            try:
                checked[name] = dev.check(devices[name])
            except (ValueError, TypeError) as exc:
                raise StreamError("%s: %s" % (what, exc)) from None
        return checked

    def _scratch_vcpu(self):
        if self._scratch is None:
            self._scratch = kvm.Vcpu(kvm.Vm(2 << 20, dirty_log=False,
                                            kvm_path=os.environ.get("COLOCORE_KVM_DEVICE",
                                                                    "/dev/kvm")))
        return self._scratch

    def load_vcpu(self, cpu):
        """Set a vCPU state checked by check_state() (the machine parked). Only the kernel
        can still refuse it, on grounds the scratch vCPU did not share; then the vCPU is
        put back as it was and StreamError raised: a refused unit changes nothing."""
        before = self.vcpu.get_state()
        try:
            self.vcpu.set_state(cpu)
        except (ValueError, OSError) as exc:
            self.vcpu.set_state(before)
            raise StreamError("the kernel refused the vCPU state: %s" % exc) from None

    def load_devices(self, devices):
        """Load device states returned by check_state(): this cannot fail."""
        for dev in (self.uart, self.console, self.platform, self.nic):
            if dev is not None:
                dev.reset()         # (a NIC the saved guest never had stays reset)
        for name, dev in self._devices().items():
            if name in devices:
                dev.load(devices[name])

    def _outputs(self):
        """Every channel the guest's output leaves by (output commit covers them all);
        the NIC's release writes its frames to the tap on the releasing thread."""
        return [self.console_out, self.serial_out] + ([self.nic.output] if self.nic else [])

    def output_marks(self):
        """How much output each channel has produced so far (taken at a checkpoint's
        pause, with the vCPU parked: exactly what the captured state produced)."""
        return tuple(out.produced for out in self._outputs())

    def release_output(self, marks):
        """Output commit: let out what was produced up to `marks` (output_marks() of a
        checkpoint the secondary now holds)."""
        for out, mark in zip(self._outputs(), marks):
            out.release(mark)

    def net_marks(self, upto):
        """Marks for release_output() that let the NIC's frames out up to `upto` and move
        no other channel (hybrid COLO's comparer releases frames between checkpoints)."""
        return tuple(upto if out is getattr(self.nic, "output", None) else 0
                     for out in self._outputs())

    def hold_output(self):
        """Entering COLO: guest output is held until a checkpoint that produced it is
        safe on the secondary (output commit)."""
        for out in self._outputs():
            out.hold = True

    def release_held_output(self):
        """Leaving COLO: nothing is held any more, and what was held goes out now (it may
        repeat what the old primary already released; it must never be lost)."""
        for out in self._outputs():
            out.hold = False
            out.release()

    def machine_info(self):
        return {"mem_size": self.mem_size, "name": self.name, "arch": "x86_64",
                "kernel": self.kernel, "append": self.append, "vcpus": 1}

    def close(self):
        with self._cond:
            self._quit = True
            self._want_run = False
            self._cond.notify_all()
        self.vcpu.kick()
        self.platform.wake()
        if self._thread is not None:
            self._thread.join(PAUSE_TIMEOUT)
