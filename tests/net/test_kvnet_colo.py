"""A networked guest under COLO (periodic), both nodes on one host: the virtio-net state
travels in every checkpoint (--colo-verify compares the whole RAM, including what the
device wrote), and after a failover the secondary serves on its own tap, which joins the
bridge only then; new connections find the guest, with every key of the last checkpoint.
The frames held per checkpoint, the mirror and open TCP connections across a failover
are tested on two host namespaces in test_colo_net*.py and test_colo_failover_tcp.py."""
import signal
import time

from colocore.tools.procs import free_port, wait_for

from netkit import GUEST_MAC, guest_lab, start_kvnet, wait_resp


def test_checkpoints_carry_the_nic_and_the_secondary_serves_after_failover(nodes):
    with guest_lab() as (lab, h, c):
        port = free_port()
        uri = "tcp:127.0.0.1:%d" % port
        sec = nodes.start("secondary", ["-m", "128M", "--incoming", uri, "--colo-verify",
                                        "--nic", "tap,ifname=taps,br=br0"],
                          prefix=lab.exec_prefix(h))
        pri = start_kvnet(nodes, lab, h, name="primary", tap="tapp", extra=["--colo-verify"])
        sec.wait_monitor()
        r = wait_resp(lab, c, node=pri)
        for cmd in ("migrate_set_capability x-colo on", "migrate_set_parameter x-checkpoint-delay 100",
                    "migrate %s" % uri):
            assert pri.hmp(cmd) == ""
        wait_for(pri, "info migrate", "Migration status: colo")
        for i in range(300):
            assert r.cmd("SET", "k%d" % i, str(i)) == "OK"
        deadline = time.monotonic() + 20
        while True:
            info = sec.hmp("info colo")
            done = "verified checkpoints:" in info and int(info.split("verified checkpoints:")[1].split(",")[0]) >= 3
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert done and "mismatches: 0" in info, info
        consumed = int(sec.hmp("info network").split("consumed ")[1].split(",")[0])
        assert consumed >= 300, "the secondary's card never got the primary's state"
        assert "mac %s" % GUEST_MAC in sec.hmp("info network")      # the guest's, not the default
        r.close()
        time.sleep(0.3)                     # a checkpoint after the last SET
        pri.kill(signal.SIGKILL)
        wait_for(sec, "info colo", "peer: lost")
        assert sec.hmp("x_colo_lost_heartbeat") == ""
        wait_for(sec, "info colo", "failover state: completed")
        r2 = wait_resp(lab, c, node=sec)
        assert r2.cmd("GET", "k299") == "299"
        assert r2.cmd("DBSIZE") == 300
