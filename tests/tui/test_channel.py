"""The console shows whether the replication channel is authenticated, and as whom."""
import asyncio

import pytest

from colocore.tools.procs import free_port, protect, wait_until as node_wait
from colocore_tui.app import create_app
from colocore.tools.pki import make_pki

from test_console import wait_until

pytestmark = pytest.mark.kvm


def test_panels_show_the_authenticated_tls_channel(nodes, tmp_path):
    pki = make_pki(str(tmp_path))
    uri = "tcp:127.0.0.1:%d" % free_port()
    sec = nodes.start("secondary", [
        "-m", "256M", "--incoming", "defer",
        "--object", "tls-creds-x509,id=tls0,dir=%s,endpoint=server" % pki["server"]])
    pri = nodes.start("primary", [
        "--kernel", "kvstore", "-m", "256M",
        "--object", "tls-creds-x509,id=tls0,dir=%s,endpoint=client" % pki["client"]])
    sec.qmp("migrate-set-parameters", {"tls-creds": "tls0"})
    sec.qmp("migrate-incoming", {"uri": uri})
    pri.qmp("migrate-set-parameters", {"tls-creds": "tls0"})
    protect(pri, uri)
    node_wait(sec, "query-colo-status", lambda d: d["mode"] == "secondary", "COLO secondary")

    async def scenario():
        app = create_app("unix:" + pri.qmp_path, "unix:" + sec.qmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            pv, sv = app.views["primary"], app.views["secondary"]
            await wait_until(pilot, lambda: pv.channel and sv.channel, "both channels")
            assert pv.channel == "tls (TLSv1.3), peer authenticated as CN=secondary,O=colocore"
            assert sv.channel == "tls (TLSv1.3), peer authenticated as CN=primary,O=colocore"
            await pilot.pause(0.6)
            screen = app.export_screenshot().replace("&#160;", " ")
            assert screen.count("channel") >= 2 and "tls (TLSv1.3), peer" in screen
    asyncio.run(scenario())
