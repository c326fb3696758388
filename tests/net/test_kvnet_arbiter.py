"""The arbiter's fence covers the NIC's frames too: a networked guest (kvnet behind a tap)
serving under --arbiter answers only while its lease is valid; an answer produced while
etcd is out of reach waits in the frame queue and goes out once the lease is renewed."""
import socket

import pytest

from colocore.tools.etcd import EtcdServer
from colocore.tools.procs import wait_until
from netkit import guest_lab, start_kvnet, wait_resp

pytestmark = pytest.mark.etcd


def test_frames_wait_for_the_lease(nodes, tmp_path):
    with guest_lab("ccna") as (lab, h, c):
        # etcd on the guest host's own loopback: the node reaches it, the client does not
        etcd = EtcdServer(str(tmp_path / "etcd-data"), host="127.0.0.1", prefix=lab.exec_prefix(h))
        etcd.start()
        try:
            node = start_kvnet(nodes, lab, h, extra=(
                "--arbiter", "etcd:%s,key=/t/kvnet,ttl=1000" % etcd.url))
            r = wait_resp(lab, c, node=node)
            assert r.cmd("SET", "a", "1") == "OK"
            etcd.kill()
            wait_until(node, "query-colo-status", lambda d: not d["arbiter"]["may-release"],
                       "the fence to close", timeout=10)
            assert node.qmp("query-colo-status")["arbiter"]["state"] == "etcd unreachable"
            r.send_raw(r.encode("GET", "a"))
            r.sock.settimeout(1.5)
            with pytest.raises(socket.timeout):
                r._fill()                       # the answer is held with the lease
            assert node.qmp("x-query-net")["tx-held"] > 0
            etcd.start()                        # same data: the lease is restored, renewed
            r.sock.settimeout(10)
            assert r.reply() == "1"
            assert r.cmd("GET", "a") == "1"
            r.close()
        finally:
            etcd.stop()
