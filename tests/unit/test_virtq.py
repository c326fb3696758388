"""The virtqueue and frame path code (colocore_ext.virtq) on a plain buffer as guest RAM
and a SOCK_SEQPACKET pair as the tap (one message = one frame), without KVM or root: a
small driver written here posts buffers and chains the way a guest does."""
import errno
import socket
import struct

import pytest

from colocore_ext import virtq
from colocore.tools.bench.net import RingDriver
from colocore.vm.devices.virtio_net import parse_mac
from colocore.net.announce import rarp_frame
from colocore.net.tap import NicError, parse_nic

RAM = 1 << 20
BUFS = 0x10000


def Driver(ram, base):
    return RingDriver(ram, base, num=8)


@pytest.fixture
def net():
    ram = bytearray(RAM)
    gram = virtq.GuestRam(memoryview(ram))
    rx, tx = Driver(ram, 0), Driver(ram, 0x8000)
    out = virtq.FrameQueue()
    path = virtq.NetPath(gram, rx.q, tx.q, out)
    host, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap.setblocking(False)
    yield ram, rx, tx, out, path, host, tap
    host.close()
    tap.close()


def test_frames_from_the_tap_land_in_posted_buffers(net):
    ram, rx, tx, out, path, host, tap = net
    for k in range(4):
        rx.post([(BUFS + 2048 * k, 2048, True)])
    frames = [bytes([k]) * (60 + 300 * k) for k in range(3)]
    for f in frames:
        host.send(f)
    host.send(b"x" * 5000)                  # longer than a buffer: dropped, not truncated
    host.send(b"y" * 10)                    # a runt: dropped
    host.send(b"z" * 14)
    assert path.rx_fill(tap.fileno()) == 4
    used = rx.used_entries()
    assert [u[1] for u in used] == [12 + len(f) for f in frames] + [12 + 14]
    for (head, n), f in zip(used, frames):
        gpa = BUFS + 2048 * head
        assert ram[gpa:gpa + 12] == b"\0" * 10 + b"\x01\x00"      # num_buffers = 1
        assert ram[gpa + 12:gpa + n] == f
    c = path.counters()
    assert c["rx_dropped_oversize"] == 1 and c["rx_dropped_runt"] == 1
    assert path.rx_consumed == 4 and path.rx_last_hash == virtq.frame_hash(b"z" * 14)
    # no buffer left: the next frame waits in the tap, nothing is lost
    host.send(b"w" * 60)
    assert path.rx_fill(tap.fileno()) == 0
    rx.post([(BUFS, 1024, True), (BUFS + 4096, 1024, True)])    # a two-buffer chain
    assert path.rx_fill(tap.fileno()) == 1
    assert rx.used_entries()[0][1] == 72


def test_transmit_chains_go_through_the_output_queue(net):
    ram, rx, tx, out, path, host, tap = net
    frame = bytes(range(200))
    ram[BUFS:BUFS + 12] = bytes(12)
    ram[BUFS + 12:BUFS + 212] = frame
    tx.post([(BUFS, 212, False)])
    ram[BUFS + 4096:BUFS + 4096 + 12] = bytes(12)       # header alone, then the frame
    ram[BUFS + 8192:BUFS + 8192 + 100] = frame[:100]
    tx.post([(BUFS + 4096, 12, False), (BUFS + 8192, 100, False)])
    tx.post([(BUFS, 20, False)])                        # too short for a frame: dropped
    out.hold = True                                     # COLO: held until released
    assert path.tx_drain() == 2
    assert len(tx.used_entries()) == 3
    assert out.pending == 2 and out.frames() == [frame, frame[:100]]
    assert out.flush(tap.fileno()) == 0
    with pytest.raises(BlockingIOError):
        host.recv(4096, socket.MSG_DONTWAIT)            # nothing released yet
    saved = out.save()
    out.release(out.base + 1)
    out.flush(tap.fileno())
    assert host.recv(4096) == frame
    with pytest.raises(BlockingIOError):
        host.recv(4096, socket.MSG_DONTWAIT)
    # what was held is device state: another queue that loads it sends it
    other = virtq.FrameQueue()
    other.load(saved)
    assert other.frames() == [frame, frame[:100]] and other.releasable == other.produced
    other.flush(tap.fileno())
    assert [host.recv(4096), host.recv(4096)] == [frame, frame[:100]]
    out.release()
    out.flush(tap.fileno())
    assert host.recv(4096) == frame[:100] and out.pending == 0


def test_bad_rings_raise_virtqueue_error(net):
    ram, rx, tx, out, path, host, tap = net
    rx.post([(RAM - 10, 2048, True)])                   # past the end of RAM
    host.send(b"a" * 60)
    with pytest.raises(virtq.VirtqueueError, match="outside RAM"):
        path.rx_fill(tap.fileno())
    ram2 = bytearray(RAM)
    d = Driver(ram2, 0)
    # a chain that loops on itself
    struct.pack_into("<QIHH", ram2, d.desc, BUFS, 100, 1, 0)
    struct.pack_into("<H", ram2, d.avail + 4, 0)
    struct.pack_into("<H", ram2, d.avail + 2, 1)
    with pytest.raises(virtq.VirtqueueError, match="loops|longer"):
        d.q.pop(virtq.GuestRam(memoryview(ram2)))
    out.load({"base": 0, "produced": 0, "frames": b""})
    with pytest.raises(ValueError):
        out.load({"base": 0, "produced": 1, "frames": struct.pack("<I", 99) + b"abc"})


def test_a_closed_tap_is_reported_not_raised(net):
    ram, rx, tx, out, path, host, tap = net
    rx.post([(BUFS, 2048, True)])
    fd = tap.fileno()
    tap.close()
    assert path.rx_fill(fd) == 0 and path.last_errno == errno.EBADF


def test_wakeup_wakes_and_times_out():
    w = virtq.Wakeup()
    assert w.wait(0.01) is False
    w.set()
    assert w.wait(1.0) is True
    w.clear()
    assert w.wait(0.01) is False
    r, s = socket.socketpair()
    s.send(b"x")
    assert w.wait(1.0, r.fileno()) is True
    w.close()
    r.close()
    s.close()


def test_nic_spec_and_announcement_frames():
    spec = parse_nic("tap,ifname=tap0,mac=52:54:00:aa:bb:cc,br=br0")
    assert (spec.ifname, spec.mac, spec.bridge) == ("tap0", "52:54:00:aa:bb:cc", "br0")
    for bad, words in (("tap", "give the tap's name"), ("tap,ifname=x,foo=1", "unknown option"),
                       ("tap,ifname=" + "x" * 16, "at most 15"), ("bridge,br=br0", "only the tap"),
                       ("tap,ifname=a,mac=zz", "six hex pairs")):
        with pytest.raises(NicError, match=words):
            parse_nic(bad)
    mac = parse_mac("52:54:00:aa:bb:cc")
    f = rarp_frame(mac)
    assert len(f) == 60 and f[:6] == b"\xff" * 6 and f[6:12] == mac and f[12:14] == b"\x80\x35"
    assert f[20:22] == b"\x00\x03" and f[22:28] == mac and f[32:38] == mac
