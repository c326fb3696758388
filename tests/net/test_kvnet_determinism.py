"""Two copies of a kvnet guest at the same state, fed the same frames, send the same
bytes: TCP initial sequence numbers, IP ids, windows and payloads come from guest state
only (hybrid COLO will compare them). Both copies are restored from one snapshot and
driven by crafted frames from a peer that exists only in this test (its own MAC and IP),
so no kernel on the way answers in between."""
import time

from netkit import (GUEST_IP, GUEST_MAC, PORT, PacketSocket, ether, guest_lab, ip_bytes, ipv4,
                    mac_bytes, start_kvnet, tcp, wait_resp)

PEER_MAC = "02:00:00:00:00:77"
PEER_IP = "10.0.0.77"


def _conversation(lab, c, node):
    ps = PacketSocket(lab, c, c.ifname)
    try:
        theirs = mac_bytes(GUEST_MAC)
        mine = mac_bytes(PEER_MAC)

        def exchange(frame, n=1):
            ps.send(frame)
            got = ps.capture(2.0 if n else 0.3, lambda f: f[6:12] == theirs and f[:6] == mine)
            assert len(got) >= n, "the guest answered %d frames, expected %d" % (len(got), n)
            return got
        arp = (b"\x00\x01\x08\x00\x06\x04\x00\x01" + mine + ip_bytes(PEER_IP) + bytes(6)
               + ip_bytes(GUEST_IP))
        out = exchange(ether("ff:ff:ff:ff:ff:ff", PEER_MAC, 0x0806, arp))
        syn = tcp(PEER_IP, GUEST_IP, 40000, PORT, 1000, 0, 0x02, options=b"\x02\x04\x05\xb4")
        synack = exchange(ether(GUEST_MAC, PEER_MAC, 0x0800, ipv4(PEER_IP, GUEST_IP, 6, syn)))
        out += synack
        isn = int.from_bytes(synack[-1][14 + 20 + 4:14 + 20 + 8], "big")
        req = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n*1\r\n$4\r\nPING\r\n"
        seg = tcp(PEER_IP, GUEST_IP, 40000, PORT, 1001, isn + 1, 0x18, req)
        out += exchange(ether(GUEST_MAC, PEER_MAC, 0x0800, ipv4(PEER_IP, GUEST_IP, 6, seg, ident=2)))
        icmp = b"\x08\x00\x00\x00\x12\x34\x00\x01" + bytes(range(48))
        from netkit import checksum
        icmp = icmp[:2] + checksum(icmp).to_bytes(2, "big") + icmp[4:]
        out += exchange(ether(GUEST_MAC, PEER_MAC, 0x0800, ipv4(PEER_IP, GUEST_IP, 1, icmp, ident=3)))
        return out
    finally:
        ps.close()


def test_two_copies_fed_the_same_frames_send_the_same_bytes(nodes, tmp_path):
    with guest_lab() as (lab, h, c):
        a = start_kvnet(nodes, lab, h, name="a")
        wait_resp(lab, c, node=a).close()
        snap = str(tmp_path / "vm.snap")
        assert a.hmp("migrate file:%s" % snap) == ""
        a.stop()
        runs = []
        for name in ("copy1", "copy2"):
            node = nodes.start(name, ["-m", "128M", "--incoming", "file:%s" % snap,
                                      "--nic", "tap,ifname=tapk,br=br0"], prefix=lab.exec_prefix(h))
            node.wait_monitor()
            time.sleep(0.8)                 # its announcement rounds are over
            runs.append(_conversation(lab, c, node))
            node.stop()
        first, second = runs
        assert len(first) == len(second)
        for x, y in zip(first, second):
            assert x == y
        # and the conversation was a real one: PONG and the GET's nil are in the reply
        payload = b"".join(first)
        assert b"$-1\r\n+OK\r\n+PONG\r\n" in payload
