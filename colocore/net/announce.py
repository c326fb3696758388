"""Telling the network that a guest's MAC moved here (after a migration, a restore, a
COLO takeover), the way QEMU's announce-self does: RARP broadcasts from the guest's MAC,
written into the tap as if the guest had sent them, in rounds (QEMU's defaults: first
after 50 ms, 5 rounds, 100 ms more between each), plus the virtio-net ANNOUNCE status
bit, raised again at every round, on which the guest sends its own gratuitous ARP (so
ARP caches learn the IP's new MAC too: RARP and gratuitous ARP rounds).

A frame that comes from the tap port teaches every bridge and switch on the way where
the MAC lives now; without it they keep sending the guest's traffic to its old port
until their forwarding entries age out (300 s on a Linux bridge)."""
import logging
import os

log = logging.getLogger("colocore.net")

ETH_P_RARP = 0x8035
ROUNDS = 5
INITIAL_MS = 50
STEP_MS = 100
MAX_MS = 550


def rarp_frame(mac):
    """QEMU's announcement: a RARP 'request reverse' from and about `mac`."""
    return (b"\xff" * 6 + mac + ETH_P_RARP.to_bytes(2, "big")
            + bytes.fromhex("0001080006040003") + mac + bytes(4) + mac + bytes(4)).ljust(60, b"\0")


def announce(loop, nic, rounds=ROUNDS, initial_ms=INITIAL_MS, step_ms=STEP_MS):
    """Schedule the announcement rounds on `loop` (the control loop) for VirtioNet `nic`:
    round i goes min(initial + i * step, 550) ms after the one before, as in QEMU."""
    frame = rarp_frame(nic.mac)
    nic.announce()

    def send(i):
        if i:
            nic.announce()          # the next round of the guest's gratuitous ARP
        fd = nic._fd()
        if fd >= 0:
            try:
                os.write(fd, frame)
            except OSError as exc:
                log.warning("announce: RARP round %d on tap %s failed: %s", i + 1,
                            nic.backend.ifname, exc.strerror)
        if i + 1 < rounds:
            loop.call_later(min(initial_ms + (i + 1) * step_ms, MAX_MS) / 1000.0, send, i + 1)
        else:
            nic.announce_done()

    loop.call_later(initial_ms / 1000.0, send, 0)
