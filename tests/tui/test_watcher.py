"""The console without nodes: a fake QMP link that can go away and come back.
No KVM needed."""
import asyncio
import time

from colocore_tui.app import create_app
from colocore_tui.link import LinkLost
from colocore_tui.model import CheckpointHistory, CheckpointRecord
from colocore_tui.watcher import colo_fields

ANSWERS = {
    "query-status": {"running": True, "status": "running"},
    "query-migrate": {"status": "colo"},
    "query-colo-status": {"mode": "primary", "last-mode": "none", "reason": "none",
                          "failover-state": "none", "peer": "connected", "peer-error": None,
                          "checkpoints": 7, "verified": 0, "verify-mismatches": 0},
    "query-migrate-capabilities": [{"capability": "x-colo", "state": True}],
    "query-migrate-parameters": {"x-checkpoint-delay": 200},
}


class FakeNode:
    def __init__(self):
        self.up = True
        self.connects = 0

    async def open(self, address):
        if not self.up:
            raise LinkLost("%s: connection refused" % address)
        self.connects += 1
        return FakeLink(self)


class FakeLink:
    def __init__(self, node):
        self.node = node

    async def execute(self, command, arguments=None):
        if not self.node.up:
            raise LinkLost("connection closed")
        return ANSWERS[command]

    async def next_event(self):
        while self.node.up:
            await asyncio.sleep(0.02)
        raise LinkLost("connection closed")

    async def close(self):
        pass


async def wait_until(pilot, cond, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for %s" % what
        await pilot.pause(0.02)


def test_lost_node_is_shown_and_reconnected():
    node = FakeNode()

    async def scenario():
        app = create_app("unix:/nowhere/p.sock", opener=node.open)
        async with app.run_test(size=(80, 24)) as pilot:
            view = app.views["primary"]
            await wait_until(pilot, lambda: view.link == "connected" and view.checkpoints == 7,
                             "first connect")
            node.up = False
            await wait_until(pilot, lambda: view.link == "lost", "lost")
            assert app.query_one("#panel-primary").has_class("-lost")
            assert app.is_running
            node.up = True
            await wait_until(pilot, lambda: view.link == "connected", "reconnect")
            assert node.connects == 2
            texts = [e[2] for e in app.query_one("#events").entries]
            assert any(t.startswith("connection lost") for t in texts)
            assert texts.count("QMP connected") == 2

    asyncio.run(scenario())


def test_history_figures():
    h = CheckpointHistory(size=100)
    for i in range(1, 201):
        h.add(CheckpointRecord(i, 1000 + i * 0.1, float(i % 100), 10, 1000, 2.0, 1.0))
    assert len(h) == 100 and h.total == 200
    p50, p99 = h.pause_percentiles()
    assert p50 == 49.5 and abs(p99 - 98.01) < 1e-9      # interpolated, as the benchmarks
    assert abs(h.per_second() - 10.0) < 1e-6
    assert abs(h.throughput() - 10000.0) < 1e-3
    assert not h.add(CheckpointRecord(200, 1000 + 200 * 0.1, 1.0, 1, 1, 1.0, 1.0))  # replay


def test_colo_status_fields():
    assert colo_fields(ANSWERS["query-colo-status"]) == {
        "colo_mode": "primary", "last_mode": "none", "reason": "none", "failover": "none",
        "peer": "connected", "checkpoints": 7, "checkpoint_mode": "", "causes": ""}
    hybrid = colo_fields(dict(ANSWERS["query-colo-status"], **{
        "checkpoint-mode": "hybrid",
        "checkpoint-causes": {"periodic": 2, "mismatch": 5, "timeout": 0, "bound": 0,
                              "request": 0}}))
    assert hybrid["checkpoint_mode"] == "hybrid" and hybrid["causes"] == "periodic 2, mismatch 5"
    assert colo_fields(dict(ANSWERS["query-colo-status"], peer="lost",
                            **{"peer-error": "EOF"}))["peer"] == "lost (EOF)"


def test_network_side_in_the_node_panel_fields():
    from colocore_tui.model import net_summary
    primary = {"tap": "tapp", "bridge": "brp", "mirror": "mp", "held": 3, "held-total": 90,
               "released-total": 87, "mirrored": 140}
    assert colo_fields(dict(ANSWERS["query-colo-status"], net=primary))["network"] == \
        "held 3, released 87, mirrored 140"
    secondary = dict(primary, mirrored=None, log={"logged": 140, "log-frames": 2,
                                                  "replayable": False})
    assert net_summary(secondary) == "mirrored 140, log 2 (replay off)"
    took = dict(secondary, takeover={"replayed": 5, "replay-skipped": None,
                                     "error": "no such bridge brs"})
    assert net_summary(took) == "replayed 5, ERROR no such bridge brs"
    assert "network" not in colo_fields(ANSWERS["query-colo-status"])      # no NIC
    compared = dict(primary, compare={"compared": 50, "matched": 48, "mismatched": 1})
    assert net_summary(compared) == "compared 50, matched 48, mismatched 1, held 3, " \
        "released 87, mirrored 140"
