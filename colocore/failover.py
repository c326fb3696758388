"""The failover state: one atomic value, changed only by compare-and-set.

none -> require (request accepted) -> active (failover work running) -> completed.
relaunch: failover was asked for while a checkpoint was being loaded on the secondary;
the load finishes, then failover runs. A second request while one runs is an error.
"""
import enum
import threading


class FailoverState(enum.Enum):
    NONE = "none"
    REQUIRE = "require"
    ACTIVE = "active"
    COMPLETED = "completed"
    RELAUNCH = "relaunch"


class Failover:
    def __init__(self):
        self._lock = threading.Lock()
        self._state = FailoverState.NONE

    @property
    def state(self):
        return self._state

    def compare_and_set(self, old, new):
        """Set `new` if the state is `old`; return the state found (== old on success)."""
        with self._lock:
            found = self._state
            if found == old:
                self._state = new
            return found

    def reset(self):
        with self._lock:
            self._state = FailoverState.NONE
