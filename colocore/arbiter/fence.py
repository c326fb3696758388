"""The fencing clock: "may this node release output now?", answered from the lease as
seen on this host's monotonic clock.

Why a lease fences at all: etcd deletes KEY only when the lease's expiry has passed on the
etcd leader's clock, and nobody else can win KEY before it is deleted. So a holder that
stops releasing output before the server-side expiry can never overlap with a successor.

The local bound. A keepalive is sent at local time t0 (read *before* the request leaves),
and answered with TTL seconds. The server refreshed the lease after t0, so on its clock
the lease lasts at least until (its time at t0) + TTL. Converting to our clock costs two
rate errors and one allowance:

    valid_until = t0 + TTL * (1 - rho) / (1 + rho) - RELEASE_ALLOWANCE

- rho = 500 ppm, for each clock: Linux never slews CLOCK_MONOTONIC faster than 500 ppm
  (adjtimex's MAXFREQ), and crystal oscillators are specified at +-100 ppm or better; a
  fast server clock ends the lease early in real time (the /(1 + rho)), a slow local clock
  makes our elapsed time look short (the * (1 - rho)). For TTL = 2 s that is 2.0 ms.
- The renewal latency needs no guess: measuring from t0 charges the whole round trip
  (and any time the request queued) against the lease.
- RELEASE_ALLOWANCE = 50 ms: the gate is checked on the control thread immediately before
  the bytes are written to the client socket, with no I/O in between; what can still come
  between check and write is a GIL hand-over (sys.getswitchinterval(), 5 ms) and a run-
  queue wait on a loaded host (CFS' scheduling period, 24 ms with 2+ cores); 50 ms covers
  both twice. A process stopped outright between check and write (SIGSTOP, a frozen host)
  is beyond what any lease can fence; that is why the allowance is charged on every check.

So for ttl=2000 the margin is 52 ms plus the renewal round trip. Renewals go out every
TTL/3, so one lost renewal still leaves about TTL/3 of validity.

The same bound turns any "nobody can act before local time t + D on a remote clock"
promise into a local deadline (`safe_until`): the COLO primary uses it for the window in
which a secondary that just acknowledged a checkpoint cannot yet have declared it silent.
"""
import threading
import time

DRIFT = 500e-6
RELEASE_ALLOWANCE = 0.050


def safe_until(t0, seconds, drift=DRIFT, allowance=RELEASE_ALLOWANCE):
    """The last local monotonic time at which a promise of `seconds` measured on another
    clock from a moment after local t0 still holds, less the release allowance."""
    return t0 + seconds * (1.0 - drift) / (1.0 + drift) - allowance


def margin(seconds, drift=DRIFT, allowance=RELEASE_ALLOWANCE):
    """What the fence gives up of a lease of `seconds` (not counting the round trip)."""
    return seconds - (safe_until(0.0, seconds, drift, allowance))


class FencingClock:
    """Thread safe. Open while either the lease (renewed) or a vouch (COLO commit window)
    covers now; closed for ever after `revoke()` (the key is lost)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._lease_until = float("-inf")
        self._vouch_until = float("-inf")
        self.revoked = False

    def renewed(self, t0, ttl_s):
        """A keepalive (or grant, or takeover) sent at local t0 came back with ttl_s."""
        until = safe_until(t0, ttl_s)
        with self._lock:
            if not self.revoked:
                self._lease_until = max(self._lease_until, until)

    def expire(self):
        """The lease is known to be gone (etcd said so): stop relying on it now."""
        with self._lock:
            self._lease_until = float("-inf")

    def vouch(self, until):
        with self._lock:
            if not self.revoked:
                self._vouch_until = max(self._vouch_until, until)

    def unvouch(self):
        with self._lock:
            self._vouch_until = float("-inf")

    def revoke(self):
        with self._lock:
            self.revoked = True
            self._lease_until = self._vouch_until = float("-inf")

    def may_release(self):
        now = self.clock()
        with self._lock:
            return not self.revoked and (now < self._lease_until or now < self._vouch_until)

    def lease_remaining(self):
        """Seconds the lease still fences for (negative: it no longer does)."""
        return self._lease_until - self.clock()

    def vouch_remaining(self):
        return self._vouch_until - self.clock()

    def lease_valid(self):
        return not self.revoked and self.clock() < self._lease_until
