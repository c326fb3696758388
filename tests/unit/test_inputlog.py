"""The COLO secondary's input log (colocore_ext.framelog, colocore/net/inputlog.py) and the
thread-safe output-commit queue (colocore_ext.virtq.FrameQueue), without KVM or root:
frames are built here, the "tap" is a SOCK_SEQPACKET pair."""
import os
import socket
import threading

import pytest

from colocore_ext import virtq
from colocore_ext.framelog import FrameLog
from colocore.net.inputlog import MirrorLog


def frame(i, size=80):
    return (b"F%07d" % i).ljust(size, b".")


def h(i, size=80):
    return virtq.frame_hash(frame(i, size))


# ---- FrameLog ---------------------------------------------------------------------------

def test_frame_log_keeps_frames_in_order_with_their_hashes():
    lg = FrameLog(16, 1 << 16)
    for i in range(10):
        lg.append(frame(i))
    assert (lg.first, lg.next, lg.frames) == (0, 10, 10)
    assert [lg.hash_at(i) for i in range(10)] == [h(i) for i in range(10)]
    assert lg.frames_from(7, 100) == [frame(7), frame(8), frame(9)]
    assert lg.find(h(4), 0, 10, 9) == 4 and lg.find(h(99), 0, 10, 0) == -1
    lg.drop_through(5)
    assert (lg.first, lg.frames) == (6, 4)
    with pytest.raises(IndexError):
        lg.hash_at(5)


def test_frame_log_is_bounded_in_frames_and_bytes_and_evicts_the_oldest():
    lg = FrameLog(8, 1 << 16)
    for i in range(20):
        lg.append(frame(i))
    assert (lg.first, lg.frames, lg.evicted, lg.evicted_through) == (12, 8, 12, 11)
    lg = FrameLog(1000, 1 << 16)             # 64 KiB: room for 6 frames of 10,000 bytes
    for i in range(30):
        lg.append(frame(i, 10_000))
        assert lg.bytes_held <= 1 << 16
    assert lg.frames_from(0, 100) == [frame(i, 10_000) for i in range(lg.first, 30)]
    assert lg.frames >= 5 and lg.evicted == 30 - lg.frames
    # frames of mixed sizes wrap around the ring and stay intact
    lg = FrameLog(64, 1 << 16)
    sizes = [60, 1514, 9000, 300, 20000, 70, 1514, 15000, 64]
    for i in range(200):
        lg.append(frame(i, sizes[i % len(sizes)]))
    kept = lg.frames_from(0, 1000)
    assert kept == [frame(i, sizes[i % len(sizes)]) for i in range(lg.first, 200)]


def test_frame_log_fill_reads_a_socket_without_python_per_frame():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.setblocking(False)
    try:
        for i in range(50):
            a.send(frame(i))
        lg = FrameLog()
        assert lg.fill(b.fileno()) == 50
        assert lg.fill(b.fileno()) == 0
        assert lg.frames_from(0, 100) == [frame(i) for i in range(50)]
    finally:
        a.close()
        b.close()


# ---- MirrorLog: matching checkpoints ----------------------------------------------------

class Guest:
    """What a guest's virtio-net says of its input: frames consumed, the last one's hash,
    all of them chained (colocore_ext.virtq.NetPath does the same in C)."""

    def __init__(self, consumed=1000):
        self.consumed = consumed
        self.last = 0x1234
        self.chain = 0x5678                 # the frames before the log began

    def take(self, *frames):
        for i in frames:
            self.consumed += 1
            self.last = h(i)
            self.chain = virtq.chain_hash(self.chain, h(i))
        return self

    def state(self):
        return self.consumed, self.last, self.chain


def test_the_chained_hash_is_what_the_frame_path_computes():
    ram = bytearray(1 << 20)
    from colocore.tools.bench.net import RingDriver
    rx, tx = RingDriver(ram, 0, num=16), RingDriver(ram, 0x8000, num=16)
    path = virtq.NetPath(virtq.GuestRam(memoryview(ram)), rx.q, tx.q, virtq.FrameQueue())
    host, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap.setblocking(False)
    try:
        for k in range(5):
            rx.post([(0x20000 + 2048 * k, 2048, True)])
            host.send(frame(k))
        assert path.rx_fill(tap.fileno()) == 5
    finally:
        host.close()
        tap.close()
    chain = virtq.FNV_OFFSET
    for k in range(5):
        chain = virtq.chain_hash(chain, h(k))
    assert path.rx_chain == chain and path.rx_last_hash == h(4)
    lg = FrameLog()
    for k in range(5):
        lg.append(frame(k))
    assert lg.chain(0, 4, virtq.FNV_OFFSET) == chain and lg.chain(3, 9, 0) is None


def mlog_with(n, start=0):
    m = MirrorLog(max_frames=64, max_bytes=1 << 17)
    for i in range(start, start + n):
        m.append(frame(i))
    return m


def test_matched_checkpoints_leave_exactly_the_unconsumed_frames():
    m, g = mlog_with(10), Guest()
    assert m.checkpoint(*g.take(0, 1, 2, 3).state())     # the first: matched by hash
    assert m.log.first == 4
    assert m.checkpoint(*g.take(4, 5, 6, 7).state())     # by count and chain
    assert m.replay(100) == ([frame(8), frame(9)], None)
    assert m.checkpoint(*g.state())                      # nothing consumed since
    m.append(frame(10))
    assert m.checkpoint(*g.take(8, 9, 10).state())
    assert m.replay(100) == ([], None)
    assert (m.matched, m.unmatched) == (3, 0)


def test_first_checkpoint_that_consumed_nothing_mirrored():
    m = mlog_with(3)
    assert m.checkpoint(*Guest().state())
    assert m.replay(10) == ([frame(0), frame(1), frame(2)], None)


def test_a_lost_mirror_frame_is_detected_and_the_log_not_replayed():
    m, g = MirrorLog(max_frames=64, max_bytes=1 << 17), Guest()
    for i in range(10):
        if i != 5:                               # the mirror link lost frame 5
            m.append(frame(i))
    assert m.checkpoint(*g.take(0, 1, 2).state())
    assert not m.checkpoint(*g.take(3, 4, 5, 6, 7, 8).state())
    frames, why = m.replay(100)
    assert frames == [] and "missing" in why
    # three later checkpoints in a row that agree by count and chain make it replayable
    for i in range(10, 16):
        m.append(frame(i))
    assert not m.checkpoint(*g.take(9).state())
    assert not m.checkpoint(*g.take(10).state()) and "disagreed lately" in m.note
    assert m.checkpoint(*g.take(11, 12, 13).state())
    assert m.replay(100) == ([frame(14), frame(15)], None)


def test_reordered_or_unconsumed_frames_are_detected():
    m, g = MirrorLog(max_frames=64, max_bytes=1 << 17), Guest()
    for i in (0, 1, 3, 2, 4, 5):                 # frames 2 and 3 swapped on the mirror
        m.append(frame(i))
    assert m.checkpoint(*g.take(0, 1).state())
    assert not m.checkpoint(*g.take(2, 3).state())       # the right count, the wrong order
    assert "reordered" in m.replay(10)[1]
    m, g = MirrorLog(max_frames=64, max_bytes=1 << 17), Guest()
    for i in (0, 2, 1, 3, 5, 4, 6):              # pairs swapped: no checkpoint agrees
        m.append(frame(i))
    assert m.checkpoint(*g.take(0).state())
    assert not m.checkpoint(*g.take(1).state())
    assert not m.checkpoint(*g.take(2, 3).state())
    assert not m.checkpoint(*g.take(4).state())
    m, g = mlog_with(6), Guest()
    assert m.checkpoint(*g.take(0).state())
    assert not m.checkpoint(*g.take(1, 4).state())       # frames 2, 3 never reached it
    assert "never consumed" in m.note


def test_a_checkpoint_ahead_of_the_mirror_waits_for_its_frames():
    m, g = mlog_with(4), Guest()
    assert m.checkpoint(*g.take(0).state())
    assert not m.checkpoint(*g.take(1, 2, 3, 4, 5).state())   # 4, 5 on their way
    assert m.pending and "waiting" in m.note
    m.append(frame(4))
    m.append(frame(5))
    m.append(frame(6))
    assert m.replay(10) == ([frame(6)], None)    # matched when they came (late, not lost)
    m, g = mlog_with(4), Guest()
    m.checkpoint(*g.take(0).state())
    m.checkpoint(*g.take(1, 2, 3, 4, 5).state())
    frames, why = m.replay(10)
    assert frames == [] and "never arrived" in why
    # still missing when the next checkpoint comes: lost, and the log moves on
    m, g = MirrorLog(max_frames=64, max_bytes=1 << 17), Guest()
    for i in (0, 1, 3):                          # frame 2 lost, ...
        m.append(frame(i))
    assert m.checkpoint(*g.take(0).state())
    assert not m.checkpoint(*g.take(1, 2, 3).state()) and m.pending
    m.append(frame(5))                           # ... and frame 4
    assert not m.checkpoint(*g.take(4, 5).state()) and not m.pending and m.unmatched == 1
    assert "missing" in m.note


def test_an_overflowing_log_stops_the_replay_until_a_checkpoint_matches_past_it():
    m, g = MirrorLog(max_frames=8, max_bytes=1 << 17), Guest()
    m.append(frame(0))
    assert m.checkpoint(*g.take(0).state())
    for i in range(1, 30):                       # a flood: the oldest go
        m.append(frame(i))
    assert m.log.frames == 8 and m.log.evicted > 0
    frames, why = m.replay(100)
    assert frames == [] and "overflowed" in why
    assert m.checkpoint(*g.take(*range(1, 26)).state())  # consumed past the evicted ones
    assert m.replay(100) == ([frame(i) for i in range(26, 30)], None)


# ---- FrameQueue: two threads, one queue ---------------------------------------------

def test_frame_queue_flushes_each_frame_once_in_order_from_two_threads():
    """The vCPU thread appends and flushes while another thread releases and flushes
    (COLO): every frame reaches the 'tap' exactly once, in order."""
    ram = bytearray(1 << 20)
    gram = virtq.GuestRam(memoryview(ram))
    from colocore.tools.bench.net import RingDriver
    rx, tx = RingDriver(ram, 0, num=256), RingDriver(ram, 0x8000, num=256)
    out = virtq.FrameQueue()
    path = virtq.NetPath(gram, rx.q, tx.q, out)
    out.hold = True
    host, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    total, batch = 12000, 8
    got = []
    done = threading.Event()

    def receiver():
        host.settimeout(5)
        while len(got) < total:
            got.append(host.recv(4096))
        done.set()

    def releaser():
        while not done.is_set():
            out.release(out.produced)
            out.flush(tap.fileno())

    threads = [threading.Thread(target=receiver)] + [threading.Thread(target=releaser)
                                                     for _ in range(3)]
    for t in threads:
        t.start()
    try:
        n = 0
        while n < total:                         # the "vCPU": transmit batches, flush
            for k in range(batch):
                gpa = 0x20000 + 2048 * ((n + k) % 256)
                ram[gpa:gpa + 12] = bytes(12)
                ram[gpa + 12:gpa + 12 + 100] = (b"%08d" % (n + k)).ljust(100, b"-")
                tx.post([(gpa, 112, False)])
            assert path.tx_drain() == batch
            tx.used_entries()
            n += batch
            out.flush(tap.fileno())
        assert done.wait(10)
    finally:
        done.set()
        for t in threads:
            t.join(10)
        host.close()
        tap.close()
    assert [int(f[:8]) for f in got] == list(range(total))
    assert out.written == total and out.pending == 0


def test_frame_queue_save_upto_leaves_out_later_and_already_written_frames():
    out = virtq.FrameQueue()
    r, w = os.pipe()
    try:
        out.hold = True
        # FrameQueue.append is C-level: fill it through a NetPath
        ram = bytearray(1 << 20)
        from colocore.tools.bench.net import RingDriver
        rx, tx = RingDriver(ram, 0, num=16), RingDriver(ram, 0x8000, num=16)
        path = virtq.NetPath(virtq.GuestRam(memoryview(ram)), rx.q, tx.q, out)
        for i in range(6):
            gpa = 0x20000 + 2048 * i
            ram[gpa + 12:gpa + 12 + 60] = (b"frame%d" % i).ljust(60, b"-")
            tx.post([(gpa, 72, False)])
        path.tx_drain()
        mark = out.produced                      # the pause: a counter read
        out.release(2)
        out.flush(w)                             # frames 0, 1 went out meanwhile
        tx.post([(0x30000, 72, False)])
        path.tx_drain()                          # frame 6: after the pause
        s = out.save_upto(mark)
        assert (s["base"], s["produced"]) == (2, 6)
        assert [f[:6] for f in _records(s["frames"])] == [b"frame%d" % i for i in range(2, 6)]
        virtq.check_frames(s["frames"], s["base"], s["produced"])
    finally:
        os.close(r)
        os.close(w)


def test_frame_queue_drops_frames_beyond_its_bound():
    out = virtq.FrameQueue(max_bytes=1000)
    ram = bytearray(1 << 20)
    from colocore.tools.bench.net import RingDriver
    rx, tx = RingDriver(ram, 0, num=16), RingDriver(ram, 0x8000, num=16)
    path = virtq.NetPath(virtq.GuestRam(memoryview(ram)), rx.q, tx.q, out)
    out.hold = True
    for i in range(10):
        tx.post([(0x20000 + 2048 * i, 12 + 300, False)])
    path.tx_drain()
    assert out.pending == 3 and out.dropped == 7


def _records(blob):
    out, off = [], 0
    while off < len(blob):
        n = int.from_bytes(blob[off:off + 4], "little")
        out.append(blob[off + 4:off + 4 + n])
        off += 4 + n
    return out
