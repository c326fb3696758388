"""kvnet's TCP as a peer on the wire sees it: replies cut to the peer's MSS, and
retransmission with exponential backoff when nothing is acknowledged. The peer is a
test-made one (own MAC and IP, crafted frames), so no kernel acknowledges for it."""
import socket
import struct
import time

from netkit import (GUEST_IP, GUEST_MAC, PORT, PacketSocket, Resp, ether, guest_lab, ip_bytes,
                    ipv4, mac_bytes, start_kvnet, tcp, wait_resp)

PEER_MAC = "02:00:00:00:00:78"
PEER_IP = "10.0.0.78"


def _tcp_of(frame):
    ip = frame[14:]
    t = ip[(ip[0] & 0xF) * 4:]
    seq, ack = struct.unpack("!II", t[4:12])
    return seq, ack, t[13], t[(t[12] >> 4) * 4:]


def test_replies_larger_than_the_mss_are_segmented(nodes):
    with guest_lab() as (lab, h, c):
        node = start_kvnet(nodes, lab, h)
        wait_resp(lab, c, node=node).close()
        ps = PacketSocket(lab, c, c.ifname)
        with lab.enter(c):
            s = socket.socket()
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
            s.connect((GUEST_IP, PORT))
        r = Resp.__new__(Resp)
        r.sock, r.buf = s, bytearray()
        big = "x" * 4000
        assert r.cmd("ECHO", big) == big
        frames = ps.capture(0.5, lambda f: f[6:12] == mac_bytes(GUEST_MAC) and f[12:14] == b"\x08\x00")
        ps.close()
        sizes = [len(_tcp_of(f)[3]) for f in frames if _tcp_of(f)[3]]
        assert sum(sizes) >= 4000 and max(sizes) <= 536 and len(sizes) >= 8, sizes
        s.close()


def test_retransmission_backs_off(nodes):
    with guest_lab() as (lab, h, c):
        node = start_kvnet(nodes, lab, h)
        wait_resp(lab, c, node=node).close()
        ps = PacketSocket(lab, c, c.ifname)
        theirs, mine = mac_bytes(GUEST_MAC), mac_bytes(PEER_MAC)
        mine_only = lambda f: f[6:12] == theirs and f[:6] == mine and f[12:14] == b"\x08\x00"
        arp = (b"\x00\x01\x08\x00\x06\x04\x00\x01" + mine + ip_bytes(PEER_IP) + bytes(6)
               + ip_bytes(GUEST_IP))
        ps.send(ether("ff:ff:ff:ff:ff:ff", PEER_MAC, 0x0806, arp))
        syn = tcp(PEER_IP, GUEST_IP, 41000, PORT, 5000, 0, 0x02, options=b"\x02\x04\x05\xb4")
        ps.send(ether(GUEST_MAC, PEER_MAC, 0x0800, ipv4(PEER_IP, GUEST_IP, 6, syn)))
        t0 = time.monotonic()
        synacks = []
        while len(synacks) < 3 and time.monotonic() - t0 < 5:
            synacks += ps.capture(0.2, mine_only, timed=True)
        assert len(synacks) >= 3, "SYN-ACK sent %d times" % len(synacks)
        isn = _tcp_of(synacks[0][1])[0]
        assert all(_tcp_of(f)[0] == isn and _tcp_of(f)[2] == 0x12 for _, f in synacks)
        gaps = [b[0] - a[0] for a, b in zip(synacks, synacks[1:])]
        assert gaps[1] > 1.5 * gaps[0], gaps          # 200 ms, then 400 ms: backoff
        # now establish, ask, and never acknowledge the answer
        ack = tcp(PEER_IP, GUEST_IP, 41000, PORT, 5001, isn + 1, 0x10)
        ps.send(ether(GUEST_MAC, PEER_MAC, 0x0800, ipv4(PEER_IP, GUEST_IP, 6, ack)))
        req = tcp(PEER_IP, GUEST_IP, 41000, PORT, 5001, isn + 1, 0x18, b"*1\r\n$4\r\nPING\r\n")
        ps.send(ether(GUEST_MAC, PEER_MAC, 0x0800, ipv4(PEER_IP, GUEST_IP, 6, req)))
        replies = []
        t0 = time.monotonic()
        while len(replies) < 3 and time.monotonic() - t0 < 5:
            replies += [(t, f) for t, f in ps.capture(0.2, mine_only, timed=True) if _tcp_of(f)[3]]
        ps.close()
        assert len(replies) >= 3 and all(_tcp_of(f)[3] == b"+PONG\r\n" for _, f in replies)
        assert len({_tcp_of(f)[0] for _, f in replies}) == 1      # the same bytes again
        gaps = [b[0] - a[0] for a, b in zip(replies, replies[1:])]
        assert gaps[1] > 1.5 * gaps[0], gaps
