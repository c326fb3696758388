"""kvnet's stack built hosted (tests/net/hosted/kvnet_hosted.c) with AddressSanitizer and
UBSan, on a tap in a test host, under real clients and garbage: the same C sources as the
guest, where a memory error aborts the process instead of corrupting a guest quietly."""
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
from pyroute2 import NetNS

from netkit import (CLIENT_IP, GUEST_IP, PORT, PacketSocket, Resp, ether, guest_lab, ipv4,
                    need_tools, run_in, tcp, wait_resp)

HERE = os.path.dirname(os.path.abspath(__file__))
GUESTS = os.path.join(HERE, "..", "..", "guests")
MAC = "52:54:00:0c:0c:07"


@pytest.fixture(scope="module")
def hosted_binary(tmp_path_factory):
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed (it builds the guests too)"
    out = str(tmp_path_factory.mktemp("hosted") / "kvnet_hosted")
    subprocess.run([gcc, "-DCOLOCORE_HOSTED", "-O1", "-g", "-Wall", "-Wextra", "-Werror",
                    "-Wno-unused-parameter", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-I", GUESTS,
                    os.path.join(GUESTS, "netstack.c"), os.path.join(GUESTS, "resp.c"),
                    os.path.join(GUESTS, "kvtable.c"), os.path.join(HERE, "hosted", "kvnet_hosted.c"),
                    "-o", out], check=True, capture_output=True, timeout=120)
    return out


def test_hosted_stack_under_clients_and_garbage(hosted_binary, tmp_path):
    need_tools("redis-benchmark")
    with guest_lab(prefix="cch") as (lab, h, c):
        log = open(tmp_path / "hosted.log", "w+")
        proc = subprocess.Popen(lab.exec_prefix(h) + [hosted_binary, "taph", MAC,
                                "ip=%s/24" % GUEST_IP, "port=%d" % PORT],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            while "taph" not in lab.links(h):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            with NetNS(h.ns) as n:
                i = n.link_lookup(ifname="taph")[0]
                n.link("set", index=i, master=n.link_lookup(ifname="br0")[0], state="up")
            keeper = wait_resp(lab, c)
            out = run_in(lab, c, ["redis-benchmark", "-h", GUEST_IP, "-t", "set,get,incr,mset",
                                  "-c", "30", "-n", "5000", "-P", "4", "-q"])
            assert out.count("requests per second") == 4
            rng = random.Random(7)
            ps = PacketSocket(lab, c, c.ifname)
            for _ in range(3000):
                kind = rng.randrange(4)
                body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 120)))
                if kind == 0:
                    f = ether(MAC, ps.mac, 0x0800, body)
                elif kind == 1:
                    f = ether(MAC, ps.mac, 0x0806, body)
                elif kind == 2:          # well-formed headers, random flags and payload
                    seg = tcp(CLIENT_IP, GUEST_IP, rng.randrange(1, 65536), PORT,
                              rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(8), body,
                              window=rng.getrandbits(16))
                    f = ether(MAC, ps.mac, 0x0800, ipv4(CLIENT_IP, GUEST_IP, 6, seg))
                else:                    # random RESP on a real connection
                    f = None
                    r = Resp(lab, c)
                    r.send_raw(b"*3\r\n$3\r\nSET\r\n" + body)
                    r.close()
                if f is not None:
                    ps.send(f)
            ps.close()
            assert keeper.cmd("SET", "survived", "yes") == "OK"
            assert keeper.cmd("GET", "survived") == "yes"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.seek(0)
        text = log.read()
        assert proc.returncode == 0, text
        assert "ERROR: AddressSanitizer" not in text and "runtime error" not in text, text
