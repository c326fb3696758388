"""One node's arbiter: who may serve the service named by KEY, decided by etcd.

Keys (all under KEY):
- KEY        leased by the node that serves: {"node": ID, "name": NAME}. It exists exactly
             while that node's lease is alive on the etcd leader.
- KEY/state  no lease: the service's lineage, {"primary": ID, "pair": TOKEN|null}. `pair`
             names the COLO secondary whose copy is complete enough to take over: the
             primary writes it once the secondary is in COLO and clears it *before* it
             releases any output that secondary did not acknowledge (serving alone).
- KEY/standby/ID  leased by each registered standby: {"name", "uri", "mem"}.

Who writes what (every write is one transaction, so etcd orders them):
- a fresh service: KEY and KEY/state both absent -> put both;
- the holder: compare KEY's lease is ours -> put KEY/state (record or clear the pair);
- the holder whose lease expired while etcd was out of reach: KEY absent and KEY/state
  unchanged since it last named us -> put KEY with a new lease (it is still the primary);
- a takeover: KEY absent (the old lease expired) and KEY/state at the revision that named
  our pair token -> put KEY with our lease and KEY/state naming us.
So a secondary can win only if the primary never served alone after naming it, and a
primary can never come back after anyone else won.

States reported: healthy, "etcd unreachable", "lost the key" (see Health).

This module is long because every role (serving, secondary, standby) moves the same
lease, fence and KEY/state under one lock: split into files, the ordering between a
renewal, a re-acquire, a pair record and a takeover would be spread out too.
"""
import enum
import logging
import os
import secrets
import socket
import threading
import time

from colocore.errors import ColocoreError
from colocore.arbiter import etcd as E
from colocore.arbiter.fence import FencingClock, margin

log = logging.getLogger("colocore.arbiter")


class Health(str, enum.Enum):
    HEALTHY = "healthy"
    UNREACHABLE = "etcd unreachable"
    LOST = "lost the key"


class Stale(ColocoreError):
    """This copy may not take over: the service went on without it."""


class Held(ColocoreError):
    """KEY is held by another node."""


POLL = 0.05          # while waiting for a lease to expire
RETRY = 0.1          # after etcd did not answer


def node_id(name):
    return "%s@%s/%d/%s" % (name, socket.gethostname(), os.getpid(), secrets.token_hex(3))


class Arbiter:
    def __init__(self, spec, name="colocore", on_lost=None, on_change=None, clock=time.monotonic):
        self.spec = spec
        self.name = name
        self.id = node_id(name)
        self.clock = clock
        # every request is bounded: a lease renewed every ttl/3 survives one lost request
        self.etcd = E.Etcd(spec.endpoints, timeout=max(0.25, min(1.0, spec.ttl_s / 4.0)))
        self.fence = FencingClock(clock)
        self.on_lost = on_lost or (lambda reason: None)
        self.on_change = on_change or (lambda status: None)
        # called on the arbiter thread whenever the fence may have reopened (a renewal, a
        # key won): output held while it was closed can go out now
        self.on_renewed = lambda: None
        self.health = Health.HEALTHY
        self.role = "none"              # none, serving, secondary, standby
        self.phase = ""
        self.lease_id = 0
        self.ttl_s = spec.ttl_s
        self.pair = None                # the pair token KEY/state names (as far as we know)
        self._pair_wanted = None
        self.holder = None              # name of KEY's holder as last seen
        self.standbys = []
        self.last_contact = None
        self.lost_reason = None
        self.takeover_at = None
        self.standby_lease = 0
        self.standby_info = None
        self._lock = threading.RLock()  # one writer of KEY/state at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None

    # ---- reporting ---------------------------------------------------------------------

    def status(self):
        lease = self.fence.lease_remaining()
        return {"state": self.health.value, "role": self.role, "phase": self.phase,
                "key": self.spec.key, "node": self.id, "holder": self.holder,
                "lease-id": self.lease_id, "ttl-ms": self.ttl_s * 1000,
                "lease-ms": int(lease * 1000) if self.role == "serving" and lease > 0 else 0,
                "margin-ms": round(margin(self.ttl_s) * 1000, 1),
                "may-release": self.fence.may_release(),
                "pair-recorded": self.pair is not None,
                "last-contact-ms": (int((self.clock() - self.last_contact) * 1000)
                                    if self.last_contact is not None else None),
                "standbys": [s["name"] for s in self.standbys],
                "protect": self.spec.protect,
                "lost-reason": self.lost_reason}

    def _set_health(self, health):
        if health != self.health and self.health != Health.LOST:
            log.log(logging.WARNING if health != Health.HEALTHY else logging.INFO,
                    "arbiter %s: %s", self.spec.key, health.value)
            self.health = health
            self._changed()
        if health == Health.HEALTHY:
            self.last_contact = self.clock()

    def _changed(self):
        try:
            self.on_change(self.status())
        except Exception:  # noqa: BLE001 - a reporting hook must not stop the arbiter
            log.exception("arbiter status hook failed")

    # ---- serving: a fresh service ----------------------------------------------------

    def serve_fresh(self):
        """Start a new service: win KEY and KEY/state while both are absent."""
        key, state_key = self.spec.key, self.spec.state_key
        try:
            t0 = self.clock()
            lid, ttl = self.etcd.grant(self.spec.ttl_s)
            ok, rev, resp = self.etcd.txn(
                [E.absent(key), E.absent(state_key)],
                [E.put(key, self._key_value(), lid),
                 E.put(state_key, {"primary": self.id, "pair": None})],
                [E.get(key), E.get(state_key)])
        except E.EtcdUnreachable as exc:
            raise ColocoreError("--arbiter: %s at %s; a serving node needs the lease on %s "
                                "before its guest may answer: start etcd or check the address"
                                % (exc, self.spec.url, key)) from None
        if not ok:
            self.etcd.revoke(lid)
            holder, state = E.Etcd.range_result(resp[0]), E.Etcd.range_result(resp[1])
            if holder is not None:
                raise Held("--arbiter: %s is held by %s: the service already runs there; "
                           "start this node as a standby (role=standby)"
                           % (key, holder.json().get("name", "?")))
            raise Held("--arbiter: %s has a history (%s names primary %s): booting a fresh "
                       "guest would replace the service's state; start this node as a standby, "
                       "or delete %s (etcdctl del) to start the service anew"
                       % (key, state_key, (state.json() if state else {}).get("primary", "?"),
                          state_key))
        self._now_serving(t0, lid, ttl)
        log.info("arbiter %s: serving (lease %x, ttl %d s, fence margin %.1f ms)",
                 key, lid, ttl, margin(ttl) * 1000)

    def _key_value(self):
        return {"node": self.id, "name": self.name}

    def _now_serving(self, t0, lid, ttl):
        with self._lock:
            self.lease_id, self.ttl_s = lid, ttl
            self.fence.renewed(t0, ttl)
            self.role = "serving"
            self.phase = "holds the key"
            self.holder = self.name
            self.pair = None
            self._set_health(Health.HEALTHY)
        self._start_thread()
        self._changed()
        self.on_renewed()

    # ---- serving: the lineage (pair) ------------------------------------------------

    def set_pair(self, token):
        """The COLO secondary with this token now holds a complete copy: record it in
        KEY/state (asynchronously: until it is recorded that secondary just cannot take
        over automatically, which is safe)."""
        with self._lock:
            self._pair_wanted = token
        self._wake.set()

    @property
    def pair_pending(self):
        """A pair was asked to be recorded and is not yet (or not yet known to be)."""
        return self._pair_wanted is not None and self._pair_wanted != self.pair

    def _record_pair(self):
        with self._lock:
            token = self._pair_wanted
            if token is None or token == self.pair or self.role != "serving" \
                    or self.health == Health.LOST:
                return
            ok, rev, _ = self.etcd.txn(
                [E.lease_is(self.spec.key, self.lease_id)],
                [E.put(self.spec.state_key, {"primary": self.id, "pair": token})])
            if ok:
                self.pair = token
                log.info("arbiter %s: the secondary (pair %s) may take over from now on",
                         self.spec.key, token)
                self._changed()
            # not ok: the lease is gone; the renewal path finds out what happened

    def go_alone(self, cancel=None):
        """Before releasing output that no secondary acknowledged: make sure no secondary
        can take over any more. Blocks while etcd is unreachable (the output stays held);
        raises Stale when another node holds the key (this node must stop)."""
        with self._lock:
            self._pair_wanted = None
        while True:
            if cancel is not None and cancel():
                return False
            if self.health == Health.LOST:
                raise Stale("this node lost %s: %s" % (self.spec.key, self.lost_reason))
            try:
                with self._lock:
                    ok, rev, _ = self.etcd.txn(
                        [E.lease_is(self.spec.key, self.lease_id)],
                        [E.put(self.spec.state_key, {"primary": self.id, "pair": None})])
                    if ok:
                        self.pair = None
                        self._set_health(Health.HEALTHY)
                        log.info("arbiter %s: serving alone; no secondary may take over",
                                 self.spec.key)
                        self._changed()
                        return True
                    # our lease is gone at the server: win it back with the pair cleared,
                    # or learn that someone else has it
                    self._reacquire(clear_pair=True)
                    if self.health != Health.LOST:
                        return True
            except E.EtcdUnreachable:
                self._set_health(Health.UNREACHABLE)
                time.sleep(RETRY)

    # ---- the renewal thread -----------------------------------------------------------

    def _start_thread(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="arbiter", daemon=True)
            self._thread.start()
        self._wake.set()

    def _run(self):
        while not self._stop.is_set():
            try:
                if self.role == "serving" and self.health != Health.LOST:
                    self._renew()
                    self._record_pair()
                    self._refresh_standbys()
                elif self.role == "standby":
                    self._renew_standby()
                elif self.health != Health.LOST:
                    self._observe()
                interval = self.ttl_s / 3.0
            except E.EtcdUnreachable:
                self._set_health(Health.UNREACHABLE)
                interval = RETRY
            except Exception:  # noqa: BLE001 - the arbiter thread must keep renewing
                log.exception("arbiter %s: unexpected error", self.spec.key)
                interval = RETRY
            self._wake.wait(interval)
            self._wake.clear()

    def _renew(self):
        lid = self.lease_id
        t0 = self.clock()
        ttl = self.etcd.keepalive(lid)
        if ttl > 0:
            self.fence.renewed(t0, ttl)
            self._set_health(Health.HEALTHY)
            self.on_renewed()
            return
        with self._lock:
            if lid != self.lease_id or self.health == Health.LOST:
                return          # go_alone() won the key back meanwhile, with a new lease
            # etcd says the lease is gone: it expired while we could not reach etcd
            self.fence.expire()
            log.warning("arbiter %s: lease %x expired at etcd; trying to win the key back",
                        self.spec.key, lid)
            self._reacquire(clear_pair=False)

    def _reacquire(self, clear_pair):
        """Our lease expired at etcd: take KEY again if nobody took over in between (KEY
        absent, KEY/state still naming us at the revision we read); else the key is lost."""
        key, state_key = self.spec.key, self.spec.state_key
        state = self.etcd.get(state_key)
        if state is None or state.json().get("primary") != self.id:
            self._lose("%s names %s as primary now" % (
                state_key, (state.json() if state else {}).get("primary", "nobody")))
            return
        t0 = self.clock()
        lid, ttl = self.etcd.grant(self.spec.ttl_s)
        ops = [E.put(key, self._key_value(), lid)]
        if clear_pair:
            ops.append(E.put(state_key, {"primary": self.id, "pair": None}))
        ok, rev, resp = self.etcd.txn([E.absent(key), E.mod_revision_is(state_key, state.mod_revision)],
                                      ops, [E.get(key)])
        if ok:
            self.lease_id, self.ttl_s = lid, ttl
            self.fence.renewed(t0, ttl)
            if clear_pair:
                self.pair = None
            self._set_health(Health.HEALTHY)
            log.info("arbiter %s: won the key back (lease %x)", key, lid)
            self._changed()
            self.on_renewed()
            return
        self.etcd.revoke(lid)
        holder = E.Etcd.range_result(resp[0]) if resp else None
        if holder is not None and holder.lease == self.lease_id and holder.json().get("node") == self.id:
            return              # it is ours: our current lease holds it
        self._lose("%s is held by %s" % (key, holder.json().get("name", "?") if holder else "?"))

    def _lose(self, reason):
        self.fence.revoke()
        self.lost_reason = reason
        self.health = Health.LOST
        self.role = "none"
        self.phase = "lost the key: " + reason
        log.error("arbiter %s: lost the key (%s); this node never releases output again",
                  self.spec.key, reason)
        self._changed()
        try:
            self.on_lost(reason)
        except Exception:  # noqa: BLE001
            log.exception("arbiter: on_lost hook failed")

    def _observe(self):
        holder = self.etcd.get(self.spec.key)
        name = holder.json().get("name") if holder else None
        self._set_health(Health.HEALTHY)
        if name != self.holder:
            self.holder = name
            self._changed()

    def _refresh_standbys(self):
        regs = self.etcd.get_prefix(self.spec.standby_prefix)
        found = []
        for kv in sorted(regs, key=lambda kv: kv.create_revision):
            info = kv.json()
            if info.get("uri"):
                found.append(dict(info, id=kv.key[len(self.spec.standby_prefix):],
                                  revision=kv.create_revision))
        if [s["id"] for s in found] != [s["id"] for s in self.standbys]:
            self.standbys = found
            self._changed()
        else:
            self.standbys = found

    def refresh_standbys(self):
        """Read the registered standbys now (callers: the protect command)."""
        self._refresh_standbys()
        return list(self.standbys)

    # ---- secondary: the takeover -----------------------------------------------------

    def take_over(self, pair=None, cancel=None):
        """The primary fell silent: wait until its lease has expired, then win KEY in one
        transaction. `pair`: our token; we may win only while KEY/state still names it
        (None: any contender may win, no lineage). Blocks while etcd is unreachable (no
        automatic failover then). Returns True when won, False when cancelled; raises Stale
        when the service went on without us."""
        key, state_key = self.spec.key, self.spec.state_key
        self.role = "secondary"
        self.phase = "waiting for the primary's lease to expire"
        self._changed()
        while True:
            if cancel is not None and cancel():
                self.phase = ""
                return False
            try:
                _, _, resp = self.etcd.txn([], [E.get(key), E.get(state_key)])
                holder, state = E.Etcd.range_result(resp[0]), E.Etcd.range_result(resp[1])
                self._set_health(Health.HEALTHY)
                if pair is not None and (state is None or state.json().get("pair") != pair):
                    raise Stale("%s no longer names this secondary (primary %s, pair %s): the "
                                "primary served on without it" % (
                                    state_key, (state.json() if state else {}).get("primary"),
                                    (state.json() if state else {}).get("pair")))
                if holder is not None:
                    self.holder = holder.json().get("name")
                    time.sleep(POLL)
                    continue
                t0 = self.clock()
                lid, ttl = self.etcd.grant(self.spec.ttl_s)
                ok, rev, _ = self.etcd.txn(
                    [E.absent(key), E.mod_revision_is(state_key, state.mod_revision if state else 0)],
                    [E.put(key, self._key_value(), lid),
                     E.put(state_key, {"primary": self.id, "pair": None})])
                if ok:
                    self.takeover_at = self.clock()
                    log.info("arbiter %s: won the key (lease %x) after the primary's lease "
                             "expired", key, lid)
                    self._now_serving(t0, lid, ttl)
                    return True
                self.etcd.revoke(lid)
            except E.EtcdUnreachable:
                self._set_health(Health.UNREACHABLE)
                time.sleep(RETRY)

    def watch_as_secondary(self):
        """A COLO secondary: report etcd's health and the holder while COLO runs."""
        self.role = "secondary"
        self.phase = "protecting " + (self.holder or "the primary")
        self._start_thread()
        self._changed()

    # ---- standby ------------------------------------------------------------------------

    def register_standby(self, info):
        """Announce this node under KEY/standby/ID until it becomes a secondary."""
        self.standby_info = dict(info, name=self.name)
        self.role = "standby"
        self.phase = "registered as a standby"
        try:
            self._register()
        except E.EtcdUnreachable:
            self._set_health(Health.UNREACHABLE)      # the thread keeps trying
        self._start_thread()

    def _register(self):
        lid, ttl = self.etcd.grant(self.spec.ttl_s)
        self.etcd.put(self.spec.standby_prefix + self.id, self.standby_info, lid)
        self.standby_lease, self.ttl_s = lid, ttl
        self._set_health(Health.HEALTHY)
        log.info("arbiter %s: registered as a standby (%s)", self.spec.key, self.standby_info["uri"])
        self._changed()

    def _renew_standby(self):
        if not self.standby_lease or self.etcd.keepalive(self.standby_lease) <= 0:
            self._register()
        else:
            self._set_health(Health.HEALTHY)
        self._observe()

    def unregister_standby(self):
        """Picked as a secondary: no longer offered to anyone."""
        lid, self.standby_lease = self.standby_lease, 0
        if self.role == "standby":
            self.role = "none"
        if lid:
            try:
                self.etcd.revoke(lid)
            except E.EtcdUnreachable:
                pass           # it expires by itself within ttl

    def resign(self, reason):
        """Another node serves now by the operator's word (it announced a takeover): stop
        releasing for good and give the lease back, so that node can win the key."""
        self.fence.revoke()
        self.lost_reason = reason
        self.health = Health.LOST
        self.role = "none"
        self.phase = "resigned: " + reason
        lid, self.lease_id = self.lease_id, 0
        self._changed()
        if lid:
            try:
                self.etcd.revoke(lid)
            except E.EtcdUnreachable:
                pass                    # it expires by itself within ttl

    # ---- shutdown ---------------------------------------------------------------------

    def close(self):
        """Leaving: stop releasing first, then give the lease back so that a secondary
        (if the state names one) takes over at once; a primary with no secondary ends the
        service's history (its guest goes with this process)."""
        self._stop.set()
        self._wake.set()
        self.fence.revoke()
        try:
            if self.role == "serving" and self.lease_id:
                with self._lock:
                    if self.pair is None:
                        self.etcd.txn([E.lease_is(self.spec.key, self.lease_id)],
                                      [E.delete(self.spec.state_key)])
                    self.etcd.revoke(self.lease_id)
            if self.standby_lease:
                self.etcd.revoke(self.standby_lease)
        except ColocoreError as exc:
            log.warning("arbiter %s: could not give the lease back (%s); it expires within "
                        "%d s", self.spec.key, exc, self.ttl_s)
        if self._thread is not None:
            self._thread.join(2.0)
