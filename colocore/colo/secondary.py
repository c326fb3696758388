"""The COLO secondary: the incoming loop that receives, verifies and loads checkpoints, and
the takeover.

    -> checkpoint-ready
    <- checkpoint-request    -> checkpoint-reply
    <- vmstate-send ... vmstate-size N [device part]   (received whole into a Unit, verified)
    -> vmstate-received      (from here on this checkpoint is applied even if the primary
                              dies: it is the newest complete state)
    load: RAM, vCPU, devices
    -> vmstate-loaded

The guest does not run between checkpoints (periodic mode), so loading needs no pause.
A checkpoint cut off anywhere before its last byte is dropped whole: the VM stays at the
previous one. A takeover waits for a load in flight (failover relaunch), so RAM, vCPU and
devices always come from one checkpoint.
"""
import logging
import time

from colocore_ext import pages

from colocore.colo import faults
from colocore.colo.checkpoint import receive
from colocore.colo.failover import FailoverState
from colocore.errors import ColocoreError, StreamError
from colocore.migration.transport import Msg, PeerLost
from colocore.vmstate import unit as units

log = logging.getLogger("colocore.colo")

# A secondary that hears nothing for this long reports its primary lost (the primary
# says something at least every second, colo/primary.py IDLE_HEARTBEAT).
SILENCE_TIMEOUT = 5.0


def run(colo, ch):
    colo.begin("secondary", ch)
    params = colo.settings.parameters
    m = colo.machine
    own_dirty = None
    try:
        # the state the initial migration brought is the first checkpoint: the primary
        # releases what it held at stop-and-copy on checkpoint-ready (matched before a
        # hybrid guest runs on and moves its counters)
        _loaded(colo, 0, time.time(), None)
        if colo.hybrid:
            # Hybrid mode: this guest runs between checkpoints, fed the same input as the
            # primary's. The cache holds RAM as of the last checkpoint loaded, so that a load
            # can put back whatever this guest wrote since (unit.apply).
            colo.cache = bytearray(m.memory.size)
            pages.copy(colo.cache, m.memory.ram)
            m.memory.harvest()          # from here on, its own writes are what it dirties
            # its frames go to the primary's comparer from now on (after marker 0), its
            # input comes live from the mirror log
            colo.network.hybrid_begin(starve=faults.HYBRID_STARVE)
            m.resume("colo")
        ch.send_msg(Msg.CHECKPOINT_READY)
        silence = colo.arbiter.silence_s if colo.arbiter is not None else SILENCE_TIMEOUT
        epoch = 0
        while colo.failover.state == FailoverState.NONE:
            hb = params["x-colo-heartbeat"]
            ch.set_timeout(hb / 1000.0 if hb else silence)
            msg = ch.recv_msg()
            if msg == Msg.CHECKPOINT_REQUEST:
                epoch += 1
                if colo.hybrid:
                    # suspend this guest before the primary captures: from the reply on,
                    # neither copy's state moves until both resume from the checkpoint;
                    # its input stops, and the comparer learns that its frames so far
                    # belong to the epoch this checkpoint ends
                    m.park_quietly()
                    colo.network.hybrid_suspend(epoch)
                    own_dirty = m.memory.harvest()
                ch.send_msg(Msg.CHECKPOINT_REPLY)
            elif msg == Msg.VMSTATE_SEND:
                t0 = time.perf_counter()
                cp = receive(ch, colo.machine)
                received_at = time.time()       # before the primary can release anything
                ch.send_msg(Msg.VMSTATE_RECEIVED)
                try:
                    _load(colo, cp, own_dirty)
                except StreamError as exc:
                    # Checked whole before vmstate-received, yet the kernel refused it: the
                    # primary may release output for a state this node does not have, so
                    # this node must never take over. Hanging up makes the primary leave
                    # COLO by itself (a closed channel: its secondary is gone).
                    colo.unusable = "checkpoint %d could not be loaded: %s" % (cp.info["id"], exc)
                    log.error("COLO secondary: %s; this node can no longer take over: hanging "
                              "up so that the primary serves alone", colo.unusable)
                    raise PeerLost(colo.unusable) from None
                # the VM is at this checkpoint now, whether or not the primary hears so
                s = colo.stats
                s.checkpoints += 1
                s.last_bytes = cp.bytes
                s.last_dirty_pages = cp.info.get("dirty", 0)
                s.last_latency_ms = (time.perf_counter() - t0) * 1000
                if cp.digest is not None:
                    _verify(colo, cp)
                _loaded(colo, cp.info["id"], received_at, cp.devices.get("virtio-net"))
                if colo.hybrid:
                    # what the primary's guest consumed after its capture goes in first
                    colo.network.hybrid_resume()
                ch.send_msg(Msg.VMSTATE_LOADED)
                if colo.hybrid:
                    own_dirty = None
                    m.unpark_quietly(True)      # both copies resume from the checkpoint
            elif msg == Msg.QUIT:
                raise PeerLost("the primary left COLO (failover on the primary)")
            else:
                raise StreamError("COLO protocol: unexpected %s" % msg.name)
    except (PeerLost, StreamError, ColocoreError, OSError) as exc:
        # the last byte from the primary (an arbiter waits `silence` from there)
        colo.last_heard = ch.last_heard
        if colo.failover.state == FailoverState.NONE:
            colo.peer_lost(exc)
        else:
            log.info("COLO secondary: channel closed for failover")
    except Exception as exc:  # noqa: BLE001 - a bug must not kill the loop silently
        log.exception("COLO secondary: internal error in the incoming loop")
        if colo.failover.state == FailoverState.NONE:
            colo.peer_lost(ColocoreError("internal error: %s" % exc))
    finally:
        colo.channel = None
        ch.close()


def _load(colo, cp, own_dirty):
    with colo.apply_lock:
        colo.loading = True
        try:
            if faults.SLOW_LOAD_S:
                time.sleep(faults.SLOW_LOAD_S)
            units.apply(cp, colo.machine, colo.cache, own_dirty)
            if own_dirty is not None:
                colo.stats.reverted_pages += len(own_dirty)
        finally:
            colo.loading = False


def _loaded(colo, checkpoint_id, received_at, net_state):
    """The VM holds this checkpoint now: the network side matches its input log against
    it; COLO_CHECKPOINT_LOADED says when the checkpoint was acknowledged and which of the
    guest's frames it covers (what a capture can check output commit against)."""
    data = {"id": checkpoint_id, "received-at": round(received_at, 6)}
    nic = colo.machine.nic
    if nic is not None:
        out = net_state["out"] if net_state is not None else {"base": nic.out.base,
                                                              "produced": nic.out.produced}
        data.update({"net-base": out["base"], "net-produced": out["produced"]})
    data.update(colo.network.loaded())
    colo.emit("COLO_CHECKPOINT_LOADED", data)


def _verify(colo, cp):
    mem = colo.machine.memory
    mine = pages.page_hashes(mem.ram, mem.all_pages())
    bad = [] if mine == cp.digest else \
        [p for p, (a, b) in enumerate(zip(mine, cp.digest)) if a != b]
    colo.stats.verified += 1
    if bad:
        colo.stats.verify_mismatches += 1
        log.error("COLO verify: checkpoint %s: %d pages differ from the primary (first: %s)",
                  cp.info.get("id"), len(bad), ", ".join("0x%x" % p for p in bad[:8]))
        colo.emit("COLO_VERIFY_MISMATCH", {"id": cp.info.get("id"), "pages": len(bad)})


def takeover(colo):
    """Secondary failover (its own thread): wait for the incoming loop and any load in
    flight, then serve from the last complete checkpoint."""
    try:
        colo.secondary_done.wait()
        if colo.unusable:
            log.error("COLO secondary: cannot take over: %s", colo.unusable)
            return
        with colo.apply_lock:
            pass            # no load in flight: RAM, vCPU and devices are one checkpoint
        colo.failover.start()
        t0 = time.perf_counter()
        if colo.hybrid:
            colo.machine.park_quietly()     # a hybrid guest runs: serve() resumes it
        # the guest is parked: the frames the checkpoint lacks go into its tap's queue,
        # then the tap onto the service network (net/colo_net.py)
        colo.network.takeover()
        t1 = time.perf_counter()
        colo.serve()        # opens the guest's chardevs, runs the guest, announces it
        colo.machine.release_held_output()
        log.info("COLO secondary: guest running (network %.1f ms, serve %.1f ms)",
                 (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000)
        colo.leave()
        colo.migration_over()
        colo.exit_event(colo.reason if colo.reason != "none" else "request")
        colo.failover.complete()
        colo.takeover_done.set()
        log.info("COLO secondary: failover completed, serving")
    except Exception:  # noqa: BLE001 - a failed takeover must be loud
        log.exception("COLO secondary: takeover failed")
