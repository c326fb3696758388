"""Output of a device towards its chardev, with output commit.

Bytes the guest emits are numbered (`produced`). They go to the chardev only up to
`releasable`: outside COLO everything is releasable at once; in COLO the checkpoint loop
moves the mark when the secondary has received the checkpoint that contains the state
which produced them (Remus output commit). Unreleased bytes are device state, saved in
every checkpoint, so a secondary that takes over releases what the primary may not have.

`fence`, when set (a node under --arbiter), is asked right before any byte is handed to
the chardev: releasable bytes wait while it says no, and `kick()` retries once it may
say yes again. It is the one release point: checked here, on the control loop, with no
I/O between the check and the write.
"""
import threading

from colocore.vm.devices import U64, check_fields

# Held output is device state: it must fit in a checkpoint's device part.
MAX_PENDING = 32 << 20


class OutputChannel:
    def __init__(self, name, deliver):
        self.name = name
        self._deliver = deliver        # deliver(bytes), called on the control loop
        self._lock = threading.Lock()
        self._pending = bytearray()    # produced, not yet released
        self._base = 0                 # sequence number of _pending[0]
        self.hold = False              # True while in COLO (output commit)
        self._releasable = 0
        self._scheduled = False
        self._schedule = None          # call_soon_threadsafe of the control loop
        self.fence = None              # may_release() of the arbiter, or None

    def attach(self, schedule):
        self._schedule = schedule

    @property
    def produced(self):
        with self._lock:
            return self._base + len(self._pending)

    def emit(self, data):
        """Called on the vCPU thread with bytes the guest wrote."""
        with self._lock:
            self._pending += data
            if not self.hold:
                self._releasable = self._base + len(self._pending)
            self._kick_locked()

    def release(self, upto=None):
        """Allow bytes up to sequence `upto` (all when None) to reach the chardev."""
        with self._lock:
            end = self._base + len(self._pending)
            self._releasable = end if upto is None else max(self._releasable, min(upto, end))
            self._kick_locked()

    def _kick_locked(self):
        if not self._scheduled and self._releasable > self._base and self._schedule is not None:
            self._scheduled = True
            self._schedule(self._flush)

    def kick(self):
        """Control loop: deliver what is releasable, if the fence allows it now."""
        with self._lock:
            self._kick_locked()

    def _flush(self):
        fence = self.fence
        with self._lock:
            self._scheduled = False
            n = self._releasable - self._base
            if n <= 0:
                return
            if fence is not None and not fence():
                return                 # held; kick() when the fence reopens
            data = bytes(self._pending[:n])
            del self._pending[:n]
            self._base += n
        self._deliver(data)

    def save(self):
        with self._lock:
            return {"base": self._base, "pending": bytes(self._pending)}

    def check(self, state):
        return check_fields(state, {"base": U64, "pending": ("bytes", MAX_PENDING)},
                            "%s output" % self.name)

    def load(self, state):
        with self._lock:
            self._base = state["base"]
            self._pending = bytearray(state["pending"])
            self._releasable = self._base if self.hold else self._base + len(self._pending)
            self._kick_locked()
