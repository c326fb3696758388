"""Migration capabilities and parameters, in QEMU's names, order and units."""
import logging

from colocore import tls
from colocore.errors import ColocoreError

log = logging.getLogger("colocore.params")

# The order QEMU 7.2's `info migrate_capabilities` prints; colocore lists the ones it
# implements.
CAPABILITY_ORDER = ("xbzrle", "compress", "events", "x-colo", "x-colo-hybrid", "return-path")

# name -> (default, unit for `info migrate_parameters`, minimum, maximum)
PARAMETERS = {
    "downtime-limit": (300, "ms", 0, 2000),
    "max-bandwidth": (134217728, "bytes/second", 0, 1 << 40),
    "xbzrle-cache-size": (67108864, "bytes", 0, 1 << 34),
    "x-checkpoint-delay": (200, "ms", 0, 1 << 31),
    "x-colo-heartbeat": (0, "ms", 0, 1 << 31),
    # hybrid COLO: a frame of the primary's guest that the secondary's has not matched
    # for this long is released by a checkpoint (QEMU's compare_timeout is 3,000 ms).
    # 20 ms: ten times the lag between the two copies measured under load here, and far
    # below a client's TCP retransmission timeout (200 ms at least), so that a reply
    # the secondary will never match still leaves before the client sends again.
    "x-compare-timeout": (20, "ms", 1, 60000),
    # pages a COLO primary keeps writable across checkpoints (dirty in two checkpoints
    # in a row: copied at every pause instead of faulting again); 0 = none
    "x-colo-hot-pages": (16384, "pages", 0, 1 << 32),
    # between checkpoints, copy the cold dirty pages once at least this many wait, so
    # that the pause handles only what was written since; 0 = off
    "x-colo-precopy": (256, "pages", 0, 1 << 32),
}
# name -> the values it takes; the first is the default where the host supports it
CHOICES = {
    # cow: dirty pages outside the hot set are write-protected (userfaultfd) at the
    # pause and copied after it; copy: every dirty page is copied inside the pause
    "x-colo-pause": ("cow", "copy"),
}
# QEMU's string parameters of the channel's TLS (QEMU prints them quoted: tls-creds: '')
TLS_PARAMETERS = ("tls-creds", "tls-hostname", "tls-authz")
PARAMETER_ORDER = ("downtime-limit", "max-bandwidth", "xbzrle-cache-size",
                   "x-checkpoint-delay", "x-colo-heartbeat", "x-compare-timeout", "x-colo-pause",
                   "x-colo-hot-pages", "x-colo-precopy") + TLS_PARAMETERS


def parse_size(text):
    t = str(text).strip()
    mult = 1
    suffixes = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "b": 1}
    if t and t[-1].lower() in suffixes:
        mult, t = suffixes[t[-1].lower()], t[:-1]
    try:
        return int(float(t) * mult)
    except ValueError:
        raise ColocoreError("%r is not a number" % text) from None


class MigrationSettings:
    """Capabilities and parameters of one node (changed from the control thread)."""

    def __init__(self, colo_supported, objects=None, cow_support=(False, "not checked")):
        self.colo_supported = colo_supported
        self.objects = objects if objects is not None else tls.Objects()
        # userfaultfd write-protect (colocore_ext.capture.uffd_wp_support()): without it
        # a COLO pause copies every dirty page itself
        self.cow_supported, self.cow_reason = cow_support
        self.capabilities = {name: False for name in self.capability_names()}
        self.parameters = {name: spec[0] for name, spec in PARAMETERS.items()}
        self.parameters.update({name: "" for name in TLS_PARAMETERS})
        self.parameters["x-colo-pause"] = "cow" if self.cow_supported else "copy"
        self.on_parameter_change = lambda name, value: None
        self._said_copy = False

    def cow_unavailable(self, reason):
        """Copy-on-write turned out not to work for this guest: pauses copy from now on."""
        self.cow_supported, self.cow_reason = False, reason
        if self.parameters["x-colo-pause"] == "cow":
            self.parameters["x-colo-pause"] = "copy"
        self.say_copy_once()

    def say_copy_once(self):
        """Log, once per process, that COLO pauses copy every dirty page themselves."""
        if not self.cow_supported and not self._said_copy:
            self._said_copy = True
            log.warning("x-colo-pause: copy: userfaultfd write-protect is not available (%s); "
                        "each COLO checkpoint copies every dirty page while the guest is "
                        "paused", self.cow_reason)

    def query_parameters(self):
        """The parameters as query-migrate-parameters returns them; where the pause cannot
        use copy-on-write, x-colo-pause-unavailable says why."""
        out = dict(self.parameters)
        if not self.cow_supported:
            out["x-colo-pause-unavailable"] = self.cow_reason
        return out

    def capability_names(self):
        return [c for c in CAPABILITY_ORDER
                if not c.startswith("x-colo") or self.colo_supported]

    def check_capability(self, name):
        if name.startswith("x-colo") and not self.colo_supported:
            raise ColocoreError("COLO is not supported on this host: it needs KVM with dirty "
                                "logging; x-colo cannot be enabled")
        if name not in self.capabilities:
            raise ColocoreError("Capability '%s' not found" % name)

    def set_capability(self, name, state):
        self.check_capability(name)
        self.capabilities[name] = bool(state)

    def check_parameter(self, name, value):
        """The value `name` would take, or a ColocoreError saying why not. Changes nothing."""
        if name in CHOICES:
            v = str(value)
            if v not in CHOICES[name]:
                raise ColocoreError("Parameter '%s' expects one of %s, got %r"
                                    % (name, ", ".join(CHOICES[name]), value))
            if name == "x-colo-pause" and v == "cow" and not self.cow_supported:
                raise ColocoreError("x-colo-pause cow needs userfaultfd write-protect, which "
                                    "is not available here (%s); pauses copy instead"
                                    % self.cow_reason)
            return v
        if name in TLS_PARAMETERS:
            return self._check_tls_parameter(name, value)
        if name not in PARAMETERS:
            raise ColocoreError("Parameter '%s' not found; known: %s"
                                % (name, ", ".join(PARAMETER_ORDER)))
        _, unit, lo, hi = PARAMETERS[name]
        v = parse_size(value) if unit in ("bytes", "bytes/second") else value
        try:
            v = int(v)
        except (TypeError, ValueError):
            raise ColocoreError("Parameter '%s' expects a number, got %r" % (name, value)) from None
        if not lo <= v <= hi:
            raise ColocoreError("Parameter '%s' expects a value between %d and %d" % (name, lo, hi))
        if name == "xbzrle-cache-size" and v and (v < 4096 * 16 or v & (v - 1)):
            raise ColocoreError("Parameter 'xbzrle-cache-size' must be a power of two of at "
                                "least 64 KiB, got %d" % v)
        return v

    def set_parameter(self, name, value):
        v = self.check_parameter(name, value)
        self.parameters[name] = v
        self.on_parameter_change(name, v)

    def _check_tls_parameter(self, name, value):
        v = "" if value is None else value
        if not isinstance(v, str):
            raise ColocoreError("Parameter '%s' expects a string, got %r" % (name, value))
        if v and name == "tls-creds":
            self.objects.creds(v, None, "Parameter 'tls-creds'")
        if v and name == "tls-authz":
            self.objects.authz(v, "Parameter 'tls-authz'")
        return v

    # ---- the TLS hooks of the channel (migration/transport.py) ------------------------

    def client_secure(self):
        """The outgoing channel's TLS wrap, or None without tls-creds."""
        creds_id = self.parameters["tls-creds"]
        if not creds_id:
            return None
        creds = self.objects.creds(creds_id, "client", "migrate")
        name = self.parameters["tls-hostname"]
        return lambda sock, host: tls.client_wrap(sock, creds, name or host, "migrate")

    def server_secure(self, what):
        """The incoming listener's TLS wrap, or None without tls-creds."""
        creds_id = self.parameters["tls-creds"]
        if not creds_id:
            return None
        creds = self.objects.creds(creds_id, "server", what)
        authz_id = self.parameters["tls-authz"]
        authz = self.objects.authz(authz_id, what) if authz_id else None
        if authz is not None and not creds.verify_peer:
            raise ColocoreError("%s: tls-authz needs client certificates: create %s with "
                                "verify-peer=on" % (what, creds_id))
        return lambda sock, peer: tls.server_wrap(sock, creds, authz, peer, what)


def pause_mode_parameters(mode):
    """The x-colo-pause, x-colo-hot-pages and x-colo-precopy values of a pause mode name
    (colo/checkpoint.py pause_mode's words: hot, pre, then cow or copy, joined by +)."""
    parts = mode.split("+")
    if parts[-1] not in ("cow", "copy") or len(set(parts)) != len(parts) or \
            [p for p in parts[:-1] if p not in ("hot", "pre")]:
        raise ColocoreError("unknown pause mode %r: use hot, pre, then cow or copy, joined by +, "
                            "e.g. copy, cow, hot+cow, hot+pre+cow" % mode)
    return {"x-colo-pause": parts[-1],
            "x-colo-hot-pages": PARAMETERS["x-colo-hot-pages"][0] if "hot" in parts else 0,
            "x-colo-precopy": PARAMETERS["x-colo-precopy"][0] if "pre" in parts else 0}
