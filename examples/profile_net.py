"""Where a networked guest's node spends its time under redis-benchmark.

Builds a client host and a guest host on a bridge (network namespaces, deleted at the
end), runs the kvnet guest, drives it with `redis-benchmark -t get -c 50 -P 16` (then
-P 1), samples the node with py-spy (`pip install py-spy`; not a colocore dependency)
and prints the share of samples per leaf function and the node's frame counters.

Run (root, /dev/kvm, redis-tools):  .venv/bin/python examples/profile_net.py [PY_SPY]
"""
import collections
import shutil
import subprocess
import sys
import tempfile
import time

from colocore.tools.netlab import Lab
from colocore.tools.procs import NodeSet


def leaves(raw_path, top=10):
    total, by_leaf = 0, collections.Counter()
    with open(raw_path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            total += int(n)
            by_leaf[stack.split(";")[-1][:90]] += int(n)
    return [(100.0 * n / total, name) for name, n in by_leaf.most_common(top)]


def main():
    pyspy = sys.argv[1] if len(sys.argv) > 1 else shutil.which("py-spy")
    if not pyspy:
        sys.exit("py-spy not found: pip install py-spy, or give its path")
    with Lab("ccprof") as lab, NodeSet() as nodes, tempfile.TemporaryDirectory() as tmp:
        h, c = lab.host("h", "10.0.0.9"), lab.host("c", "10.0.0.1")
        lab.bridge(h, "br0", h.address)
        lab.wire(c, h, b_bridge="br0")
        node = nodes.start("guest", ["--kernel", "kvnet", "-m", "256M", "--nic",
                                     "tap,ifname=tapp,br=br0", "--append", "ip=10.0.0.2/24"],
                           prefix=lab.exec_prefix(h))
        for _ in range(100):
            if subprocess.run(lab.exec_prefix(c) + ["redis-cli", "-h", "10.0.0.2", "PING"],
                              capture_output=True, text=True).stdout.strip() == "PONG":
                break
            time.sleep(0.2)
        for pipeline, requests in ((16, 2_000_000), (1, 200_000)):
            bench = subprocess.Popen(lab.exec_prefix(c) + [
                "redis-benchmark", "-h", "10.0.0.2", "-t", "get", "-c", "50", "-P", str(pipeline),
                "-n", str(requests), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(1)
                raw = "%s/P%d.txt" % (tmp, pipeline)
                subprocess.run([pyspy, "record", "-p", str(node.pid), "-d", "8", "-r", "500",
                                "--threads", "--native", "-f", "raw", "-o", raw],
                               capture_output=True, check=True)
            finally:
                bench.kill()
                bench.wait()
            print("-P %d, share of samples by leaf:" % pipeline)
            for share, name in leaves(raw):
                print("  %5.1f%%  %s" % (share, name))
        print(node.hmp("info network"))


if __name__ == "__main__":
    main()
