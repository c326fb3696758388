"""The failover state machine (QEMU's colo-failover.c): one value, one compare-and-set,
one table of who may move it where, and the rule of who may decide a failover alone.

    none --request--> require --start--> active --complete--> completed
                         |  ^
               (loading) v  | (the load is in)
                       relaunch

Every change of the state goes through `Failover._move`, which refuses a move that is not
in TRANSITIONS; the methods below are the only callers. The work a failover does is the
role's: colo/primary.py (leave COLO, release held output, serve alone) and
colo/secondary.py (take over from the last complete checkpoint).
"""
import enum
import threading

from colocore.errors import ColocoreError


class FailoverState(enum.Enum):
    NONE = "none"
    REQUIRE = "require"
    ACTIVE = "active"
    COMPLETED = "completed"
    RELAUNCH = "relaunch"


S = FailoverState

# (from, to): who makes the move, and when.
TRANSITIONS = {
    (S.NONE, S.REQUIRE): "request: x_colo_lost_heartbeat (the operator, x-colo-heartbeat, "
                         "or a primary whose secondary's process is gone)",
    (S.REQUIRE, S.RELAUNCH): "request, on a secondary that is loading a checkpoint: the "
                             "load finishes first, so RAM and devices are one checkpoint",
    (S.RELAUNCH, S.REQUIRE): "start, on a secondary: the load the request waited for is in",
    (S.REQUIRE, S.ACTIVE): "start: the role's failover work begins (primary: COLO thread; "
                           "secondary: takeover)",
    (S.ACTIVE, S.COMPLETED): "complete: the survivor serves alone",
}


class Failover:
    """The failover state of one COLO run (a new run starts with a new Failover)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._state = S.NONE

    @property
    def state(self):
        return self._state

    @property
    def requested(self):
        """A failover was asked for and its work has not started yet."""
        return self._state in (S.REQUIRE, S.RELAUNCH)

    def _move(self, old, new):
        """Compare-and-set: move to `new` if the state is `old`; return the state found."""
        if (old, new) not in TRANSITIONS:
            raise AssertionError("no failover transition %s -> %s" % (old.value, new.value))
        with self._lock:
            found = self._state
            if found == old:
                self._state = new
            return found

    def request(self, loading=False):
        """Accept a failover request once; a second one is an error (as QEMU)."""
        if self._move(S.NONE, S.REQUIRE) != S.NONE:
            raise ColocoreError("COLO failover is already active")
        if loading:
            self._move(S.REQUIRE, S.RELAUNCH)

    def start(self):
        """The failover work may begin (after any load a relaunch waited for)."""
        self._move(S.RELAUNCH, S.REQUIRE)
        return self._move(S.REQUIRE, S.ACTIVE) == S.REQUIRE

    def complete(self):
        self._move(S.ACTIVE, S.COMPLETED)


def may_decide_alone(mode, peer_closed, heartbeat_ms):
    """Who may decide a failover without an operator, when the peer is lost. Returns
    (decide, why).

    - A primary whose channel was closed or reset by the secondary's end leaves COLO by
      itself: that secondary's process is gone and can never serve a newer state.
    - Silence decides nothing by default: a dead host and a partition look alike, and a
      silent peer may be alive and serving behind a partition (split brain).
    - x-colo-heartbeat (off by default) lets silence decide, with that risk.
    - Under --arbiter this rule is not asked: an etcd lease decides (colo/state.py
      `_arbiter_decides`, control/arbiter.py): a primary serves alone only after etcd
      recorded that its secondary may no longer take over; a secondary takes over only if
      it wins the key once the primary's lease has expired.
    A secondary that takes over says so on the return path (Msg.TAKEOVER), and a primary
    that hears it stops its guest (colo/primary.py), so that one copy serves."""
    if mode == "primary" and peer_closed:
        return True, "the secondary is gone"
    if heartbeat_ms:
        return True, "x-colo-heartbeat is %d ms" % heartbeat_ms
    return False, None
