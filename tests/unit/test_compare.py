"""The comparer (colo/compare.py) on crafted frames: segmentation may differ, bytes may
not; ACKs must be covered by both sides; frames leave in the order they were produced."""
import struct

from hypothesis import given, settings, strategies as st

from colocore.colo.compare import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, Comparer, Frame

GUEST, CLIENT = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 9])
MAC = b"\x52\x54\x00\x12\x34\x56"


def ip(proto, l4):
    head = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0, GUEST, CLIENT)
    return MAC + b"\x02" * 6 + b"\x08\x00" + head + l4


def tcp(seq, ack, data=b"", flags=TCP_ACK, sport=6379, dport=40000):
    return ip(6, struct.pack(">HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + data)


def udp(data, sport=53, dport=5353):
    return ip(17, struct.pack(">HHHH", sport, dport, 8 + len(data), 0) + data)


def arp():
    return MAC + b"\xff" * 6 + b"\x08\x06" + bytes(28)


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def feed_primary(c, frames):
    for n, f in enumerate(frames):
        c.primary(f, n)


def test_same_bytes_in_other_segments_match_and_leave_in_order():
    c = Comparer(0.05)
    data = bytes(range(256)) * 8
    feed_primary(c, [tcp(1000, 50, data[:1500]), tcp(2500, 50, data[1500:])])
    assert c.releasable() is None                     # nothing from the secondary yet
    for i in range(0, len(data), 300):
        c.secondary(tcp(1000 + i, 50, data[i:i + 300]))
    assert c.releasable() == 2 and c.divergence() is None


def test_a_differing_byte_is_a_mismatch():
    c = Comparer(0.05)
    feed_primary(c, [tcp(1, 9, b"+OK\r\n")])
    c.secondary(tcp(1, 9, b"+OK\r\r"))
    assert c.divergence() == "mismatch" and c.releasable() is None


def test_the_ack_must_be_covered_by_the_secondary():
    c = Comparer(0.05)
    feed_primary(c, [tcp(1, 120, b"$1\r\nx\r\n")])
    c.secondary(tcp(1, 100, b"$1\r\nx\r\n"))          # it has not seen the client's 20 bytes
    assert c.releasable() is None
    c.secondary(tcp(8, 120))                          # now it has
    assert c.releasable() == 1
    feed_primary_more = [tcp(8, 140)]                 # a pure ACK for more client data
    c.primary(feed_primary_more[0], 1)
    assert c.releasable() is None
    c.secondary(tcp(8, 140))
    assert c.releasable() == 2


def test_syn_fin_rst_count_and_compare():
    c = Comparer(0.05)
    feed_primary(c, [tcp(5000, 1, flags=TCP_SYN | TCP_ACK), tcp(5001, 30, b"hi", TCP_ACK | TCP_FIN),
                     tcp(5004, 30, flags=TCP_RST)])
    c.secondary(tcp(5000, 1, flags=TCP_SYN | TCP_ACK))
    c.secondary(tcp(5001, 30, b"hi"))
    assert c.releasable() == 1                        # data matched, the FIN not yet
    c.secondary(tcp(5003, 30, flags=TCP_ACK | TCP_FIN))
    assert c.releasable() == 2
    c.secondary(tcp(5004, 30, flags=TCP_RST))
    assert c.releasable() == 3
    d = Comparer(0.05)
    d.primary(tcp(5000, 1, flags=TCP_SYN | TCP_ACK), 0)
    d.secondary(tcp(7000, 1, flags=TCP_SYN | TCP_ACK))       # another ISN: they diverged
    assert d.divergence() == "mismatch"


def test_retransmissions_of_matched_bytes_match_again():
    clock = Clock()
    c = Comparer(0.05, clock=clock)
    feed_primary(c, [tcp(1, 9, b"abcdef"), tcp(1, 9, b"abcdef"), tcp(4, 9, b"def")])
    c.secondary(tcp(1, 9, b"abcdef"))
    assert c.releasable() == 1                        # paired by its bytes at once
    clock.t = 0.03                                    # the rest: after half the timeout
    assert c.divergence() is None and c.releasable() == 3


def test_udp_and_icmp_by_payload_arp_at_once_but_in_order():
    c = Comparer(0.05)
    feed_primary(c, [arp(), udp(b"one"), arp()])
    assert c.releasable() == 1                        # the first ARP; the UDP frame waits
    c.secondary(udp(b"one"))
    assert c.releasable() == 3
    c.primary(udp(b"two"), 3)
    c.secondary(udp(b"TWO"))
    assert c.divergence() == "mismatch"


def test_unmatched_too_long_is_a_timeout_and_a_bound_is_a_checkpoint():
    clock = Clock()
    c = Comparer(0.01, max_frames=8, clock=clock)
    c.primary(tcp(1, 1, b"x"), 0)
    assert c.divergence() is None
    clock.t = 0.02
    assert c.divergence() == "timeout"
    d = Comparer(10, max_frames=8, clock=clock)
    feed_primary(d, [tcp(1 + i, 1, b"y") for i in range(9)])
    assert d.divergence() == "bound"                  # a checkpoint, never a drop


def test_a_new_epoch_releases_what_the_checkpoint_holds_and_compares_the_rest_afresh():
    c = Comparer(0.05)
    feed_primary(c, [tcp(1, 1, b"aa"), tcp(3, 1, b"bb"), tcp(5, 1, b"cc")])
    c.secondary(tcp(1, 1, b"XX"))                      # diverged before the checkpoint
    assert c.divergence() == "mismatch"
    c.new_epoch(captured=2)                           # frames 0 and 1 were in its state
    assert c.divergence() is None and c.releasable() is None
    c.secondary(tcp(5, 1, b"cc"))                     # the secondary, resumed from it
    assert c.releasable() == 3


def test_frames_that_are_not_ipv4_tcp_udp_icmp_are_not_compared():
    assert Frame(b"\x00" * 10).kind == "other"
    assert Frame(arp()).kind == "other"
    assert Frame(tcp(1, 1, b"z")).kind == "tcp"
    assert Frame(tcp(1, 1, b"z")[:40]).kind == "other"   # cut inside the TCP header


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=3000), cuts_p=st.lists(st.integers(1, 3000), max_size=8),
       cuts_s=st.lists(st.integers(1, 3000), max_size=8), flip=st.one_of(st.none(), st.integers(0, 2999)))
def test_any_segmentation_of_the_same_bytes_matches_and_one_changed_byte_never(data, cuts_p,
                                                                              cuts_s, flip):
    def segments(cuts):
        points = sorted({0, len(data), *(x % len(data) for x in cuts)})
        return [(a, data[a:b]) for a, b in zip(points, points[1:]) if b > a]
    c = Comparer(1.0)
    pri = segments(cuts_p)
    for n, (off, piece) in enumerate(pri):
        c.primary(tcp(100 + off, 7, piece), n)
    sec = data if flip is None else \
        data[:flip % len(data)] + bytes([data[flip % len(data)] ^ 1]) + data[flip % len(data) + 1:]
    for off, piece in [(a, sec[a:a + len(p)]) for a, p in segments(cuts_s)]:
        c.secondary(tcp(100 + off, 7, piece))
    if flip is None:
        assert c.releasable() == len(pri) and c.divergence() is None
    else:
        assert c.divergence() == "mismatch"


def test_the_secondary_flooding_alone_reaches_the_bound_too():
    c = Comparer(10, max_frames=8)
    for i in range(8):
        c.secondary(udp(b"extra %d" % i))            # output the primary never produced
    assert c.divergence() == "bound"


def test_byte_identical_frames_pair_without_parsing_and_the_rest_by_the_rules():
    c = Comparer(1.0)
    same = tcp(1, 9, b"+OK\r\n")
    c.primary(same, 0)
    c.secondary(same)
    assert c.releasable() == 1 and not c.streams          # paired by bytes, nothing parsed
    c.primary(tcp(6, 9, b"abcdef"), 1)
    c.secondary(tcp(6, 9, b"abc"))                       # another segmentation: the rules
    c.secondary(tcp(9, 9, b"def"))
    assert c.releasable() == 2 and c.divergence() is None


def test_after_a_checkpoint_held_frames_time_out_only_from_the_secondarys_resume():
    clock = Clock()
    c = Comparer(0.02, clock=clock)
    c.primary(tcp(1, 1, b"late"), 0)                      # produced after the capture
    clock.t = 0.5                                         # the checkpoint took a while
    c.new_epoch(captured=0)
    c.restart_clock()                                     # vmstate-loaded
    assert c.divergence() is None
    c.secondary(tcp(1, 1, b"late"))
    assert c.releasable() == 1


def test_a_long_stream_is_trimmed_and_a_retransmission_of_trimmed_bytes_still_matches():
    clock = Clock()
    c = Comparer(0.05, clock=clock, max_bytes=1 << 30, max_frames=1 << 20)
    chunk, n = bytes(range(256)) * 4, 3000               # 3 MiB on one connection
    for i in range(n):
        f = tcp(1 + i * len(chunk), 9, chunk)
        c.primary(f, i)
        c.secondary(tcp(1 + i * len(chunk), 9, chunk[:512]))      # other segmentation
        c.secondary(tcp(1 + i * len(chunk) + 512, 9, chunk[512:]))
        assert c.releasable() == i + 1
    assert c.sec_bytes <= 2 * (1 << 20) + len(chunk)        # kept to what may be needed
    c.primary(tcp(1, 9, chunk), n)                          # a retransmission of the start
    clock.t = 0.03
    assert c.divergence() is None and c.releasable() == n + 1
