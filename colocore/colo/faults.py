"""Crash points for tests: the primary kills itself with SIGKILL at a chosen moment of a
chosen checkpoint, so tests can cut the protocol exactly where they want (mid-send,
between vmstate-received and vmstate-loaded, ...).

    COLOCORE_CRASH_AT=POINT[:CHECKPOINT]     e.g. mid-ram:3, after-received:2

    COLOCORE_SLOW_LOAD_MS=N                  the secondary takes N ms more to load
                                             each checkpoint (widens the window in
                                             which a failover request must relaunch)

    COLOCORE_HYBRID_STARVE=1                 a hybrid secondary feeds its guest no input
                                             (its output stops: the primary's comparer
                                             fills to its bound)

Off (the default) it costs one comparison per point.
"""
import os
import signal

_spec = os.environ.get("COLOCORE_CRASH_AT", "")
POINT, _, _n = _spec.partition(":")
CHECKPOINT = int(_n) if _n.isdigit() else 1

HYBRID_STARVE = os.environ.get("COLOCORE_HYBRID_STARVE") == "1"

SLOW_LOAD_S = int(os.environ.get("COLOCORE_SLOW_LOAD_MS", "0") or 0) / 1000.0

POINTS = ("after-request", "mid-ram", "before-devstate", "mid-devstate", "after-received",
          "after-loaded")


def armed(point, checkpoint_id):
    return POINT == point and checkpoint_id == CHECKPOINT


def crash(point, checkpoint_id):
    if POINT == point and checkpoint_id == CHECKPOINT:
        os.kill(os.getpid(), signal.SIGKILL)
