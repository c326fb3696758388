"""The COLO primary: the checkpoint loop, and the primary's side of a failover.

Runs on the migration thread once the initial live migration ended with x-colo on (the
secondary's checkpoint-ready was read before the guest resumed):

    every x-checkpoint-delay (or at once on a trigger):
      -> checkpoint-request   <- checkpoint-reply
      pause: dirty log, hot/cow split, copy, vCPU, devices, resume  (Checkpointer.capture)
      -> vmstate-send [RAM ... END] vmstate-size N [N bytes of device part]
      <- vmstate-received     release the output held up to this checkpoint
      <- vmstate-loaded

Output commit: what the guest printed up to a checkpoint's pause is released only once the
secondary answered vmstate-received for that checkpoint: from then on the secondary can
serve a state that produced it.
"""
import logging
import time

from colocore.colo import faults
from colocore.colo.compare import Comparer
from colocore.colo.failover import FailoverState
from colocore.errors import ColocoreError, StreamError
from colocore.migration.transport import Msg, PeerLost, PeerTookOver

log = logging.getLogger("colocore.colo")

REPLY_TIMEOUT = 10.0
# The primary says something at least this often, even with a long checkpoint delay, so
# that a secondary notices a silent primary (a dead host, a partition) and reports it;
# without x-colo-heartbeat it still waits for the operator to decide.
IDLE_HEARTBEAT = 1.0
# How often the primary pre-copies between checkpoints (x-colo-precopy): the pages a
# pause still has to handle are those written since the last pre-copy.
PRECOPY_EVERY = 0.02


def run(colo, ch, checkpointer):
    """The checkpoint loop. Returns when COLO ends; the guest runs on here."""
    m = colo.machine
    colo.begin("primary", ch)
    params = colo.settings.parameters
    arb = colo.arbiter
    if arb is not None:
        arb.colo_started()
    try:
        checkpoint_id = 0
        comparer = None
        if colo.hybrid:
            # the comparer releases the guest's frames as soon as the secondary's guest
            # produced the same, and asks for a checkpoint when they diverge
            comparer = Comparer(params["x-compare-timeout"] / 1000.0)
            colo.stats.compare_active = colo.network.hybrid_begin(comparer,
                                                                  colo.request_checkpoint)
        while colo.failover.state == FailoverState.NONE:
            woken = _wait_delay(colo, ch, params, checkpointer.precopy)
            if colo.failover.state != FailoverState.NONE:
                break
            cause = colo.take_cause("request" if woken else "periodic")
            if comparer is not None:
                # a new x-compare-timeout applies from this checkpoint on (a float store)
                comparer.timeout = params["x-compare-timeout"] / 1000.0
            checkpoint_id += 1
            hb = params["x-colo-heartbeat"]
            ch.set_timeout(hb / 1000.0 if hb else (arb.silence_s if arb else REPLY_TIMEOUT))
            t0 = time.perf_counter()
            t_request = time.monotonic()
            ch.send_msg(Msg.CHECKPOINT_REQUEST)
            ch.expect(Msg.CHECKPOINT_REPLY)
            faults.crash("after-request", checkpoint_id)
            cap = checkpointer.capture()
            sent, raw = checkpointer.send(ch, cap, checkpoint_id)
            ch.expect(Msg.VMSTATE_RECEIVED)
            faults.crash("after-received", checkpoint_id)
            if arb is not None:
                # the secondary heard us after t_request: it cannot call us silent (and
                # take over) before t_request + silence, so this output may go out
                # until then even if the lease cannot be renewed
                arb.checkpoint_acked(t_request)
            # Output commit: the secondary holds the state that produced these bytes and
            # frames; it applies it even if this node dies now, before vmstate-loaded
            # (colo/secondary.py), so releasing here cannot show a client output that a
            # takeover would not have. The frames are written to the tap here and now.
            m.release_output(cap.marks)
            # Hybrid: the frames the guest sent after the capture stay held and are
            # compared with what the secondary's guest sends once it resumed from this
            # state (fed the frames this guest consumed after the capture); a divergence
            # found while this checkpoint was under way concerned the epoch it ends.
            colo.network.hybrid_epoch(checkpoint_id, cap.marks[-1])
            colo.drop_compare_request()
            ch.expect(Msg.VMSTATE_LOADED)
            colo.network.hybrid_loaded()
            faults.crash("after-loaded", checkpoint_id)
            colo.stats.causes[cause] += 1
            _account(colo, checkpoint_id, cap, sent, raw, (time.perf_counter() - t0) * 1000,
                     cause)
    except PeerTookOver as exc:
        colo.channel = None
        ch.close()
        _stopped_by_takeover(colo, exc)
        return
    except (PeerLost, StreamError, ColocoreError, OSError) as exc:
        if colo.failover.state == FailoverState.NONE:
            colo.peer_lost(exc)
    except Exception as exc:  # noqa: BLE001 - a bug must not end COLO silently
        log.exception("COLO primary: internal error in the checkpoint loop")
        ch.close()          # the secondary sees the primary gone, as it is
        if colo.failover.state == FailoverState.NONE:
            colo.peer_lost(PeerLost("internal error: %s" % exc, closed=False))
    finally:
        colo.channel = None
    # Wait for the operator (or the heartbeat) to fail over; the guest runs meanwhile,
    # its output held: releasing it before a failover decision could lose it.
    while not colo.failover.requested:
        if colo.quitting.wait(0.01):
            return
    _failover(colo, ch)


def _wait_delay(colo, ch, params, between=None):
    """Sleep x-checkpoint-delay, waking early on trigger; heartbeat while idle;
    `between()` (the pre-copy) every PRECOPY_EVERY (at least twice per delay). Returns
    whether the trigger ended it."""
    delay = params["x-checkpoint-delay"] / 1000.0
    hb = params["x-colo-heartbeat"] / 1000.0
    # under an arbiter the secondary calls us silent after `silence`: speak 4x as often
    idle = min(IDLE_HEARTBEAT, colo.arbiter.silence_s / 4) if colo.arbiter else IDLE_HEARTBEAT
    every = hb / 3 if hb else idle
    now = time.monotonic()
    deadline, next_hb = now + delay, now + every
    woken = False
    while True:
        now = time.monotonic()
        left = deadline - now
        if left <= 0 or colo.failover.state != FailoverState.NONE:
            break
        step = min(left, next_hb - now)
        if between is not None:
            step = min(step, max(PRECOPY_EVERY / 4, min(PRECOPY_EVERY, delay / 2)))
        if colo.trigger.wait(max(step, 0)):
            woken = True
            break
        if between is not None and time.monotonic() < deadline:
            between()
        now = time.monotonic()
        if now < deadline and now >= next_hb:
            ch.send_msg(Msg.HEARTBEAT)
            next_hb = now + every
    colo.trigger.clear()
    return woken


def _account(colo, checkpoint_id, cap, sent, raw, latency_ms, cause="periodic"):
    s = colo.stats
    s.checkpoints += 1
    pause_ms = cap.pause_s * 1000
    s.last_pause_ms = pause_ms
    s.total_pause_ms += pause_ms
    s.max_pause_ms = max(s.max_pause_ms, pause_ms)
    s.last_dirty_pages = cap.dirty
    s.last_mode = cap.mode
    s.last_hot_pages = cap.hot
    s.last_cow_pages = cap.cow
    s.last_wp_faults = cap.faults
    s.last_unchanged_pages = cap.skipped
    s.last_bytes = sent
    s.last_raw = raw
    s.total_bytes += sent
    s.last_latency_ms = latency_ms
    data = {"id": checkpoint_id, "cause": cause, "pause-ms": round(pause_ms, 3),
            "dirty-pages": cap.dirty, "bytes": sent, "raw-bytes": raw,
            "compression-ratio": round(raw / sent, 3) if sent else 0.0,
            "latency-ms": round(latency_ms, 3), "mode": cap.mode,
            "hot-pages": cap.hot, "cow-pages": cap.cow, "pause-copied-pages": cap.in_pause,
            "unchanged-pages": cap.skipped, "wp-faults": cap.faults,
            "pause-steps-us": {k: round(v, 1) for k, v in cap.steps_us.items()}}
    data.update(colo.network.checkpoint_figures(cap))
    colo.emit("COLO_CHECKPOINT", data)


def _failover(colo, ch):
    """Leave COLO and serve alone: the held output goes out, the migration is over."""
    colo.failover.start()
    if ch is not None:
        try:
            ch.send_msg(Msg.QUIT)
        except ColocoreError:
            pass
        ch.close()
    colo.machine.release_held_output()
    colo.leave()
    colo.exit_event(colo.reason if colo.reason != "none" else "request")
    colo.migration_over()
    colo.failover.complete()
    log.info("COLO primary: failover completed, serving alone")


def _stopped_by_takeover(colo, exc):
    """The secondary took over while this primary still runs: stop the guest here, so that
    only one copy serves. Its held output stays held: the secondary has the state that
    produced what was released, and nothing newer may reach a client."""
    colo.peer_state = "took over"
    colo.peer_error = str(exc)
    colo.stop_for_good("COLO primary")
    log.error("COLO primary: %s; this guest is stopped so that only one copy serves. "
              "Quit this node (or re-protect from the new primary)", exc)
    colo.exit_event("error")
    colo.leave()
    colo.migration_over()
    if colo.arbiter is not None:
        colo.arbiter.peer_took_over()
