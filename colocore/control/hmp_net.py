"""HMP's words for the guest's network: `info network` (the card) and the network lines of
`info colo` (COLO's network side: frames held and released, the mirror, the secondary's
input log, the replay at a takeover). Printers over the data of control/commands.py."""


def format_colo_net(n):
    """The network lines of `info colo` (query-colo-status "net")."""
    if not n:
        return []
    where = "tap %s%s" % (n["tap"], " (service bridge %s)" % n["bridge"] if n["bridge"] else "")
    mirrored = "" if n.get("mirrored") is None else ", mirrored %d" % n["mirrored"]
    lines = ["network: %s, mirror link %s" % (where, n["mirror"] or "none"),
             "network frames: held %d, held in checkpoints %d, released %d%s"
             % (n["held"], n["held-total"], n["released-total"], mirrored)]
    lg = n.get("log")
    if lg:
        lines.append("mirror log: logged %d, in log %d frames %d bytes, evicted %d, socket "
                     "drops %d; checkpoints matched %d, not matched %d; replay %s (%s)"
                     % (lg["logged"], lg["log-frames"], lg["log-bytes"], lg["log-evicted"],
                        lg["socket-dropped"], lg["matched"], lg["unmatched"],
                        "ready" if lg["replayable"] else "off", lg["note"]))
    c = n.get("compare")
    if c:
        lines.append("hybrid: frames compared %d, matched %d, mismatched %d, not compared "
                     "(ARP, IPv6) %d; held %d, released on a match %d; stale secondary "
                     "frames %d; x-compare-timeout %g ms"
                     % (c["compared"], c["matched"], c["mismatched"], c["passed"], c["held"],
                        c["released"], c["stale"], c["timeout-ms"]))
    if "fed" in n:
        lines.append("hybrid: input fed to the guest up to mirror frame %d; frames sent to the "
                     "comparer %d, dropped %d" % (n["fed"], n["tee-sent"], n["tee-dropped"]))
    t = n.get("takeover")
    if t:
        line = "takeover: replayed %d frames into tap %s" % (t["replayed"], t["tap"])
        if t["replay-skipped"]:
            line += ", not replayed: %s" % t["replay-skipped"]
        if t["error"]:
            line += "; network error: %s" % t["error"]
        lines.append(line)
    return lines


def format_network(n):
    c = n["counters"]
    b = n["backend"]
    return "\n".join([
        "virtio-net: mac %s, link %s, backend %s" % (
            n["mac"], "up" if n["link-up"] else "down", "tap %s" % b["ifname"] if b else "none"),
        "  rx: %d frames %d bytes, dropped %d runt %d oversize; consumed %d, last hash %016x" % (
            c["rx_frames"], c["rx_bytes"], c["rx_dropped_runt"], c["rx_dropped_oversize"],
            c["rx_consumed"], c["rx_last_hash"]),
        "  tx: %d frames %d bytes, dropped %d; held %d, written %d, write errors %d" % (
            c["tx_frames"], c["tx_bytes"], c["tx_dropped"], n["tx-held"], n["tx-written"],
            n["tx-write-errors"]),
        "  vcpu: %d exits, %d waits" % (n["vcpu-exits"], n["waits"])])
