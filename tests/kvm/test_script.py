"""`colocore script`: the shipped scenarios run green; failures stop what they started."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")


def _script(path_or_text, tmp_path, timeout=180):
    args = [sys.executable, "-m", "colocore", "script"]
    stdin = None
    if os.path.exists(path_or_text):
        args.append(path_or_text)
    else:
        args.append("-")
        stdin = path_or_text
    args += ["--workdir", str(tmp_path / "work")]
    p = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
    records = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    return p.returncode, records, p.stderr


def _pids_gone(records):
    for r in records:
        if r.get("op") == "start" and "pid" in r:
            assert not os.path.exists("/proc/%d" % r["pid"]) or \
                open("/proc/%d/stat" % r["pid"]).read().split()[2] == "Z", r


@pytest.mark.parametrize("name", ["protect_guest", "failover_primary_crash",
                                  "failover_secondary_crash"])
def test_example_scenarios(name, tmp_path):
    rc, records, err = _script(os.path.join(EXAMPLES, name + ".colo"), tmp_path)
    steps = [r for r in records if "step" in r]
    assert rc == 0, (records[-5:], err)
    assert all(r["ok"] for r in steps)
    assert records[-1]["summary"] == "ok"
    events = {r["event"] for r in records if "event" in r}
    assert {"MIGRATION", "COLO_CHECKPOINT"} <= events or name != "protect_guest"
    if name != "protect_guest":
        assert "COLO_EXIT" in events
    _pids_gone(records)


def test_failed_expectation_stops_nodes(tmp_path):
    rc, records, err = _script("node a run --kernel kvstore -m 64M\n"
                               "@a info status\n"
                               "expect @a paused\n"
                               "@a info version\n", tmp_path)
    assert rc == 1
    steps = [r for r in records if "step" in r]
    assert [s["ok"] for s in steps] == [True, True, False]
    assert "expected /paused/" in steps[-1]["error"]
    assert records[-1] == dict(records[-1], summary="failed", failed_line=3)
    _pids_gone(records)


def test_timeout_and_hmp_error(tmp_path):
    rc, records, _ = _script("node a run --kernel kvstore -m 64M\n"
                             "@a? frobnicate\n"
                             "expect @a unknown command\n"
                             "console @a PING\n"
                             "expect @a ^PONG$\n"
                             "wait @a colo 0.3\n", tmp_path)
    assert rc == 1
    assert "timeout" in [r for r in records if "step" in r][-1]["error"]
    _pids_gone(records)
    rc, records, _ = _script("node a run --kernel kvstore -m 64M\n@a frobnicate\n", tmp_path)
    assert rc == 1 and records[-1]["failed_line"] == 2
    _pids_gone(records)


def test_syntax_error_starts_nothing(tmp_path):
    rc, records, err = _script("node a run --kernel kvstore\n@a info status\nfly @a away\n", tmp_path)
    assert rc == 2 and records == []
    assert "line 3: unknown step 'fly'" in err
    assert not os.path.exists(str(tmp_path / "work" / "a.log"))


def test_attach_to_a_running_node(nodes, tmp_path):
    node = nodes.start("ext", ["--kernel", "kvstore", "-m", "64M"])
    node.wait_monitor()
    rc, records, err = _script(
        "node x attach unix:%s qmp=unix:%s console=%s\n"
        "console @x SET k 1\n"
        "@x stop\n"
        "wait @x STOP 10\n"
        "@x cont\n"
        "wait @x running\n"
        "console @x GET k\n"
        "expect @x ^1$\n" % (node.monitor_path, node.qmp_path, node.console), tmp_path)
    assert rc == 0, (records, err)
    assert any(r.get("event") == "STOP" for r in records)
    assert node.proc.poll() is None          # attached nodes are left running
