"""The console against a real local pair over QMP, driven with App.run_test() and Pilot.

Every node is started through the `nodes` fixture (or the --demo pair) and stopped by pid
after the test, pass or fail.
"""
import asyncio
import time

import psutil
import pytest

from colocore.tools.procs import start_protected_pair
from colocore_tui.app import create_app
from colocore_tui.screens.delay import DelayScreen
from colocore_tui.screens.failover import FailoverScreen
from colocore_tui.widgets.timeline import CheckpointTimeline
from textual.widgets import Input, Sparkline

pytestmark = pytest.mark.kvm


def protected_pair(nodes):
    paths = {r: "%s/%s-qmp.sock" % (nodes.workdir, r) for r in ("primary", "secondary")}
    pri, sec = start_protected_pair(
        nodes, primary_extra=("--qmp", "unix:%s,server=on,wait=off" % paths["primary"]),
        secondary_extra=("--qmp", "unix:%s,server=on,wait=off" % paths["secondary"]))
    return pri, sec, {r: "unix:" + p for r, p in paths.items()}


async def wait_until(pilot, cond, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        await pilot.pause(0.05)


def logged(app, text):
    return any(text in entry[2] for entry in app.query_one("#events").entries)


def test_timeline_fills_and_delay_is_set_on_the_node(nodes):
    pri, sec, addr = protected_pair(nodes)

    async def scenario():
        app = create_app(addr["primary"], addr["secondary"])
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: len(app.history) >= 8, "8 checkpoints in the timeline")
            pv, sv = app.views["primary"], app.views["secondary"]
            await wait_until(pilot, lambda: pv.colo_mode == "primary" and sv.colo_mode == "secondary",
                             "both panels in COLO")
            assert pv.link == sv.link == "connected"
            assert pv.migration == "colo" and pv.vm_status == "running"
            assert pv.pid == pri.pid and sv.pid == sec.pid          # local: psutil figures
            assert pv.rss_bytes and pv.rss_bytes > 0
            chart = app.query_one(CheckpointTimeline).query_one("#chart-pause_ms", Sparkline)
            assert len(chart.data) >= 8
            p50, p99 = app.history.pause_percentiles()
            assert 0 < p50 <= p99
            assert 2 < app.history.per_second() < 8                 # 200 ms delay
            settings = app.query_one("#settings")
            await wait_until(pilot, lambda: settings.parameters.get("x-checkpoint-delay") == 200,
                             "the primary's parameters")
            assert settings.capabilities.get("x-colo") is True

            await pilot.press("d")
            await wait_until(pilot, lambda: isinstance(app.screen, DelayScreen), "the delay dialog")
            app.screen.query_one(Input).value = ""
            await pilot.press("3", "5", "0", "enter")
            await wait_until(pilot, lambda: settings.parameters.get("x-checkpoint-delay") == 350,
                             "the new delay read back from the node")
            assert logged(app, "x-checkpoint-delay set to 350 ms")
        assert "x-checkpoint-delay: 350 ms" in pri.hmp("info migrate_parameters")

    asyncio.run(scenario())


def test_primary_dies_and_failover_makes_the_secondary_take_over(nodes):
    pri, sec, addr = protected_pair(nodes)

    async def scenario():
        app = create_app(addr["primary"], addr["secondary"])
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: len(app.history) >= 3, "checkpoints flowing")
            pri.kill()                                  # the primary's host dies (by pid)
            pv, sv = app.views["primary"], app.views["secondary"]
            await wait_until(pilot, lambda: pv.link == "lost", "the primary shown as lost")
            assert logged(app, "connection lost")
            await pilot.press("f")
            await wait_until(pilot, lambda: isinstance(app.screen, FailoverScreen),
                             "the failover confirmation")
            await pilot.press("s")
            await wait_until(pilot, lambda: sv.failover == "completed" and sv.vm_status == "running",
                             "the secondary's failover to complete", timeout=10)
            await wait_until(pilot, lambda: sv.colo_mode == "none" and sv.last_mode == "secondary",
                             "the secondary out of COLO")
            assert logged(app, "failover requested: secondary takes over")
            assert logged(app, "-> completed")
            await wait_until(pilot, lambda: logged(app, "COLO_EXIT"), "COLO_EXIT in the log")
            panel = app.query_one("#panel-secondary")
            assert panel.view.failover == "completed" and panel.has_class("-connected")
            assert app.query_one("#panel-primary").has_class("-lost")
            assert pv.link == "lost"                    # and the console itself is fine
        assert "failover state: completed" in sec.hmp("info colo")

    asyncio.run(scenario())


def test_demo_starts_a_pair_and_quit_stops_it():
    async def scenario():
        app = create_app(demo=True)
        pids = {}
        try:
            async with app.run_test(size=(80, 24)) as pilot:
                await wait_until(pilot, lambda: len(app.history) >= 3, "demo checkpoints", timeout=25)
                pids = app.demo.pids()
                assert set(pids) == {"primary", "secondary"}
                assert all(psutil.pid_exists(p) for p in pids.values())
                await wait_until(pilot, lambda: app.demo.load.count > 0, "the client load")
                await pilot.press("q")
        finally:
            app.demo.close()
        return pids

    pids = asyncio.run(scenario())
    assert pids and not any(psutil.pid_exists(p) for p in pids.values())


def test_reprotect_key_shows_the_standby_and_protects_onto_it(nodes, etcd_server):
    """A node serving alone under --arbiter and a registered standby: `r` shows the standby
    the node will use; `y` sends x-colo-protect and the pair enters COLO."""
    from colocore.tools.procs import free_port, wait_for
    from colocore_tui.screens.protect import ProtectScreen
    arb = "etcd:%s,key=/tui/svc,ttl=1000" % etcd_server.url
    pri = nodes.start("primary", ["--kernel", "kvstore", "-m", "256M", "--arbiter", arb])
    sb = nodes.start("standby-a", ["-m", "256M", "--incoming", "tcp:127.0.0.1:%d" % free_port(),
                                   "--arbiter", arb + ",role=standby"])
    pri.wait_monitor()
    sb.wait_monitor()
    wait_for(pri, "info colo_standbys", "standby-a")

    async def scenario():
        app = create_app("unix:" + pri.qmp_path, "unix:" + sb.qmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            pv = app.views["primary"]
            await wait_until(pilot, lambda: pv.arbiter_role == "serving", "the arbiter in the panel")
            assert pv.arbiter.startswith("healthy, serving") and "standby-a" in pv.arbiter
            await pilot.press("r")
            await wait_until(pilot, lambda: isinstance(app.screen, ProtectScreen), "the dialog")
            assert "standby-a" in str(app.screen.query_one(".dialog-body").render())
            await pilot.press("y")
            await wait_until(pilot, lambda: pv.colo_mode == "primary", "COLO on the primary",
                             timeout=30)
            assert logged(app, "protecting the primary onto a standby")
    asyncio.run(scenario())
    assert "COLO mode: secondary" in sb.hmp("info colo")
