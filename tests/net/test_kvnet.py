"""The kvnet guest on a real network: a client host and a guest host joined by a bridge
(network namespaces made with pyroute2), the node's tap set up by the node itself, and
real clients: ICMP echo, redis-cli, redis-benchmark, redis-py."""

import pytest

from netkit import (GUEST_IP, PORT, Resp, guest_lab, icmp_ping, need_redis_py, need_tools,
                    redis_in, run_in, start_kvnet, wait_resp)


@pytest.fixture
def lab():
    with guest_lab() as env:
        yield env


def test_ping_redis_cli_and_the_tap_the_node_made(nodes, lab):
    need_tools("redis-cli")
    lab_, h, c = lab
    node = start_kvnet(nodes, lab_, h)
    wait_resp(lab_, c, node=node).close()
    assert "tapk" in lab_.links(h)
    times = icmp_ping(lab_, c, GUEST_IP, count=3, size=1000)
    assert len(times) == 3
    assert run_in(lab_, c, ["redis-cli", "-h", GUEST_IP, "PING"]).strip() == "PONG"
    assert run_in(lab_, c, ["redis-cli", "-h", GUEST_IP, "SET", "greeting", "hello"]).strip() == "OK"
    assert run_in(lab_, c, ["redis-cli", "-h", GUEST_IP, "GET", "greeting"]).strip() == "hello"
    info = node.hmp("info network")
    assert "link up, backend tap tapk" in info and "mac 52:54:00:0c:0c:02" in info
    node.stop()
    # the node created tapk: it is gone with the node
    assert "tapk" not in lab_.links(h)


def test_redis_py_ten_thousand_keys_pipelined_and_every_command(nodes, lab):
    redis = need_redis_py()
    lab_, h, c = lab
    node = start_kvnet(nodes, lab_, h)
    wait_resp(lab_, c, node=node).close()
    r = redis_in(lab_, c, GUEST_IP, PORT, socket_timeout=10, decode_responses=True)
    n = 10_000
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.set("key:%05d" % i, "value-%d" % i)
    assert pipe.execute() == [True] * n
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.get("key:%05d" % i)
    assert pipe.execute() == ["value-%d" % i for i in range(n)]
    assert r.dbsize() == n
    # one request at a time too, on the same connection
    for i in range(0, n, 997):
        assert r.get("key:%05d" % i) == "value-%d" % i
    assert r.exists("key:00001", "key:00002", "nope") == 2
    assert r.delete("key:00001", "nope") == 1
    assert r.get("key:00001") is None
    assert r.incr("counter") == 1 and r.incr("counter") == 2
    with pytest.raises(redis.ResponseError, match="not an integer"):
        r.incr("key:00002")
    assert r.mset({"a": "1", "b": "2", "c": "3"}) is True
    assert r.mget("a", "nope", "c") == ["1", None, "3"]
    assert r.echo("hi there") == "hi there"
    assert r.config_get("save") == {}
    assert r.execute_command("COMMAND") == {}      # redis-py turns the empty list into a dict
    assert r.execute_command("CLIENT", "SETINFO", "lib-name", "colocore-test") == "OK"
    info = r.info()
    assert info["redis_mode"] == "standalone" and info["db0"]["keys"] == n + 3
    with pytest.raises(redis.ResponseError, match="unknown command"):
        r.execute_command("NOSUCH", "x")
    with pytest.raises(redis.ResponseError, match="value too long"):
        r.set("k", "v" * 33)
    assert r.flushall() is True
    assert r.dbsize() == 0
    r.close()


def test_pipelined_benchmark_and_128_concurrent_connections(nodes, lab):
    need_tools("redis-benchmark")
    lab_, h, c = lab
    node = start_kvnet(nodes, lab_, h)
    wait_resp(lab_, c, node=node).close()
    out = run_in(lab_, c, ["redis-benchmark", "-h", GUEST_IP, "-t", "set,get", "-c", "50",
                           "-n", "20000", "-P", "16", "-q"], timeout=120)
    assert out.count("requests per second") == 2, out
    # 128 clients at once, each holding its connection: every one gets its own answers
    conns = [Resp(lab_, c) for _ in range(128)]
    for i, r in enumerate(conns):
        r.send_raw(Resp.encode("SET", "conn%d" % i, str(i)) + Resp.encode("GET", "conn%d" % i))
    for i, r in enumerate(conns):
        assert r.reply() == "OK" and r.reply() == str(i)
    assert int(Resp(lab_, c).cmd("INFO").split("connected_clients:")[1].split()[0]) >= 129
    for r in conns:
        r.close()
    # the same again with redis-benchmark's 128 clients
    out = run_in(lab_, c, ["redis-benchmark", "-h", GUEST_IP, "-t", "get", "-c", "128",
                           "-n", "5000", "-q"], timeout=120)
    assert "requests per second" in out, out


def test_connection_churn_and_time_wait(nodes, lab):
    """QUIT makes the guest close first, so every such connection leaves a TIME_WAIT
    behind; 600 of them in a row (more than the 512-slot table) must not lock out new
    clients, and 128 connections open at once still fit afterwards."""
    need_tools("redis-benchmark")
    lab_, h, c = lab
    node = start_kvnet(nodes, lab_, h)
    wait_resp(lab_, c, node=node).close()
    for i in range(600):
        r = Resp(lab_, c)
        assert r.cmd("SET", "churn", str(i)) == "OK"
        assert r.cmd("QUIT") == "OK"
        assert r.closed_by_peer()
        r.close()
    held = [Resp(lab_, c) for _ in range(128)]
    assert all(r.cmd("GET", "churn") == "599" for r in held)
    for r in held:
        r.close()
    # redis-benchmark without keepalive: a new connection for every request
    out = run_in(lab_, c, ["redis-benchmark", "-h", GUEST_IP, "-t", "get", "-c", "20",
                           "-n", "3000", "-k", "0", "-q"], timeout=120)
    assert "requests per second" in out, out
    stats = node.hmp("info network")
    assert "link up" in stats
