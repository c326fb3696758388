"""TLS on the migration/COLO channel and on the monitors, the way QEMU does it: the
destination starts with --incoming defer, gets tls-creds (and tls-authz) and only then
migrate_incoming; the source sets tls-creds (and tls-hostname) and migrates. Certificates
come from a throw-away PKI made with openssl (colocore/tools/pki.py)."""
import asyncio
import json
import socket
import ssl
import time

import pytest

from colocore.tools.procs import free_port, protect, wait_until
from colocore.tools.pki import fingerprint, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def _creds(pki, which, endpoint, extra=""):
    return ["--object", "tls-creds-x509,id=tls0,dir=%s,endpoint=%s%s" % (pki[which], endpoint, extra)]


def _secondary(nodes, pki, authz="CN=primary", name="secondary"):
    args = ["-m", "256M", "--incoming", "defer", *_creds(pki, "server", "server")]
    if authz:
        args += ["--object", "authz-simple,id=auth0,identity=%s" % authz]
    sec = nodes.start(name, args)
    sec.wait_monitor()
    assert sec.hmp("migrate_set_parameter tls-creds tls0") == ""
    if authz:
        assert sec.hmp("migrate_set_parameter tls-authz auth0") == ""
    uri = "tcp:127.0.0.1:%d" % free_port()
    sec.qmp("migrate-incoming", {"uri": uri})
    return sec, uri


def _primary(nodes, pki, which="client", name="primary", hostname=None):
    pri = nodes.start(name, ["--kernel", "kvstore", "-m", "256M", *_creds(pki, which, "client")])
    pri.wait_monitor()
    params = {"tls-creds": "tls0"}
    if hostname is not None:
        params["tls-hostname"] = hostname
    pri.qmp("migrate-set-parameters", params)
    return pri


def _tls_client_context(pki, which):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki["ca_pem"])
    d = pki[which]
    ctx.load_cert_chain(d + "/client-cert.pem", d + "/client-key.pem")
    return ctx


def _gets_nothing(address, ctx=None, send=b"COLOCORE" + bytes(64)):
    """Connect (with TLS if ctx), send, and read: a refused peer reads no byte at all."""
    host, port = address
    s = socket.create_connection((host, port), timeout=5)
    got = b""
    try:
        if ctx is not None:
            s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
        s.sendall(send)
        s.settimeout(5)
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    except (OSError, ssl.SSLError):
        pass
    finally:
        s.close()
    return got


def _port(uri):
    return ("127.0.0.1", int(uri.rpartition(":")[2]))


def test_tls_colo_pair_is_mutually_authenticated_and_says_so(nodes, pki):
    sec, uri = _secondary(nodes, pki)
    params = sec.hmp("info migrate_parameters")
    assert "tls-creds: 'tls0'" in params and "tls-authz: 'auth0'" in params
    assert "tls-hostname: ''" in params
    assert sec.qmp("query-migrate-parameters")["tls-creds"] == "tls0"
    # a second migrate_incoming is refused, as in QEMU
    assert "already been started" in sec.hmp("migrate_incoming %s" % uri)
    # the client checks the server's name: a wrong tls-hostname fails, nothing is sent
    pri = _primary(nodes, pki, hostname="not-the-secondary.example")
    pri.qmp("migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True}]})
    pri.qmp("migrate", {"uri": uri})
    st = wait_until(pri, "query-migrate", lambda d: d["status"] == "failed", "the refused migrate")
    assert "certificate refused" in st["error-desc"] and "not-the-secondary" in st["error-desc"]
    assert pri.qmp("query-status")["status"] == "running"
    # the right name: the pair is protected over TLS, each side knows who the other is
    pri.qmp("migrate-set-parameters", {"tls-hostname": "localhost"})
    protect(pri, uri, delay_ms=100)
    wait_until(sec, "query-colo-status", lambda d: d["mode"] == "secondary", "COLO secondary")
    wait_until(pri, "query-colo-status", lambda d: d["checkpoints"] >= 3, "3 checkpoints")
    chan = pri.qmp("query-migrate")["x-channel"]
    assert chan["tls"] and chan["authenticated"]
    assert chan["peer-identity"] == "CN=secondary,O=colocore"
    assert chan["tls-version"] in ("TLSv1.2", "TLSv1.3")
    assert "channel: tls (TLSv1.3), peer authenticated as CN=secondary,O=colocore" in \
        pri.hmp("info migrate")
    assert "channel: tls (TLSv1.3), peer authenticated as CN=primary,O=colocore" in \
        sec.hmp("info migrate")


def test_tls_listener_refuses_strangers_and_names_them(nodes, pki):
    """Finding 'Anyone who can reach --incoming can make the node run a guest of their
    choosing': with tls-creds and tls-authz, no stranger gets a byte or a state in."""
    sec, uri = _secondary(nodes, pki)
    addr = _port(uri)
    # plain TCP (a replayed snapshot header), no certificate, wrong CA, expired,
    # a valid certificate that authz does not pin: no byte back, each refusal logged
    assert _gets_nothing(addr) == b""
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(pki["ca_pem"])
    assert _gets_nothing(addr, no_cert) == b""
    for which in ("wrong_ca", "expired", "intruder"):
        assert _gets_nothing(addr, _tls_client_context(pki, which)) == b"", which
    # a whole stranger node with a valid but unpinned certificate cannot become the primary
    intruder = _primary(nodes, pki, which="intruder", name="intruder", hostname="localhost")
    intruder.qmp("migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True}]})
    intruder.qmp("migrate", {"uri": uri})
    wait_until(intruder, "query-migrate", lambda d: d["status"] == "failed", "the refused stranger")
    assert sec.qmp("query-status")["status"] == "inmigrate"
    assert sec.qmp("query-colo-status")["mode"] == "none"
    log = sec.log_tail(200)
    assert log.count("refused 127.0.0.1:") >= 6, log
    assert "certificate has expired" in log and "unable to get local issuer" in log
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in log and "WRONG_VERSION_NUMBER" in log
    assert "CN=intruder,O=colocore" in log and "not allowed by authz auth0" in log
    # the listener is still there for the real primary, even while a silent connection
    # holds its TLS handshake open (it runs on that connection's thread, not the accept loop)
    silent = socket.create_connection(addr)
    try:
        pri = _primary(nodes, pki, hostname="localhost")
        protect(pri, uri, delay_ms=100)
        wait_until(sec, "query-colo-status", lambda d: d["mode"] == "secondary", "COLO secondary")
    finally:
        silent.close()


def test_tls_authz_pins_a_certificate_fingerprint(nodes, pki):
    pinned = fingerprint(pki["client"] + "/client-cert.pem")
    sec, uri = _secondary(nodes, pki, authz=pinned)
    assert _gets_nothing(_port(uri), _tls_client_context(pki, "intruder")) == b""
    pri = _primary(nodes, pki, hostname="localhost")
    pri.qmp("migrate", {"uri": uri})
    wait_until(pri, "query-migrate", lambda d: d["status"] == "completed", "the migration")
    chan = sec.qmp("query-migrate")["x-channel"]
    assert chan["peer-fingerprint"] == pinned[7:] and chan["authenticated"]


def test_tls_on_qmp_monitor_and_console_chardevs(nodes, pki):
    ports = {w: free_port() for w in ("qmp", "serial", "console")}
    tls_opt = ",tls-creds=tls0,tls-authz=auth0"
    node = nodes.start("tlsnode", [
        "--kernel", "kvstore", *_creds(pki, "server", "server"),
        "--object", "authz-simple,id=auth0,identity=CN=primary",
        "--qmp", "tcp:127.0.0.1:%d,server=on,wait=off%s" % (ports["qmp"], tls_opt),
        "--serial", "tcp:127.0.0.1:%d,server=on,wait=off%s" % (ports["serial"], tls_opt),
        "--console", "tcp:127.0.0.1:%d,server=on,wait=off%s" % (ports["console"], tls_opt)])
    node.wait_monitor()
    good = _tls_client_context(pki, "client")

    async def qmp():
        # asyncio streams: qemu.qmp 0.0.6's disconnect() hangs on a TLS stream on 3.11
        r, w = await asyncio.open_connection("127.0.0.1", ports["qmp"], ssl=good)
        greeting = json.loads(await asyncio.wait_for(r.readline(), 10))
        w.write(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status", "id": 1}\n')
        await w.drain()
        replies = [json.loads(await asyncio.wait_for(r.readline(), 10)) for _ in range(2)]
        w.close()
        await w.wait_closed()
        return greeting, replies
    greeting, replies = asyncio.run(qmp())
    assert "QMP" in greeting and replies[0] == {"return": {}}
    assert replies[1]["return"]["status"] == "running" and replies[1]["id"] == 1
    # the console: the guest answers through TLS
    s = good.wrap_socket(socket.create_connection(("127.0.0.1", ports["console"]), timeout=10),
                         server_hostname="127.0.0.1")
    deadline = time.monotonic() + 10
    got = b""
    while b"PONG" not in got and time.monotonic() < deadline:
        s.sendall(b"PING\n")
        s.settimeout(0.5)
        try:
            got += s.recv(4096)
        except (TimeoutError, ssl.SSLError):
            pass
    s.close()
    assert b"PONG" in got
    # strangers get no greeting, no prompt, no guest output
    for port in ports.values():
        assert _gets_nothing(("127.0.0.1", port), send=b'{"execute": "qmp_capabilities"}\n') == b""
        assert _gets_nothing(("127.0.0.1", port), _tls_client_context(pki, "intruder"),
                             send=b"PING\n") == b""
    log = node.log_tail(100)
    assert "qmp chardev: refused 127.0.0.1:" in log and "console chardev: refused" in log
