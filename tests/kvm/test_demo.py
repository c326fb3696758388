"""`colocore demo` (the protected pair) and `colocore demo --snapshot`, as a user runs them."""
import json
import subprocess
import sys

import pytest


def _demo(*args):
    p = subprocess.run([sys.executable, "-m", "colocore", "demo", "--json", *args],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    steps = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    return p.returncode, steps, p.stderr


def test_protected_demo_loses_nothing():
    rc, steps, err = _demo("--seconds", "1.5")
    assert rc == 0, (steps, err)
    names = [s["step"] for s in steps]
    assert names[0] == "protected" and "checkpoint" in names and names[-1] == "summary"
    summary = steps[-1]
    assert summary["ok"] and summary["keys_lost"] == 0 and summary["keys_acknowledged"] > 0
    assert summary["serving_after_failover"]
    assert any(s["step"] == "crash" for s in steps)


def test_snapshot_demo():
    rc, steps, err = _demo("--snapshot", "--keys", "500")
    assert rc == 0, (steps, err)
    assert [s["step"] for s in steps] == ["boot", "write", "save", "restore", "summary"]
    assert steps[-1]["keys_missing"] == 0


@pytest.mark.etcd
def test_auto_demo_fails_over_and_reprotects_by_itself():
    rc, steps, err = _demo("--auto", "--seconds", "1.5")
    assert rc == 0, (steps, err)
    names = [s["step"] for s in steps]
    assert names == ["etcd", "serving", "protected", "crash", "failover", "check", "reprotected",
                     "crash", "failover", "check", "summary"], names
    assert all(s["automatic"] for s in steps if s["step"] == "failover")
    assert all(s["keys_lost"] == 0 for s in steps if s["step"] == "check")
    assert steps[-1]["ok"] and steps[-1]["operator_commands"] == 0
