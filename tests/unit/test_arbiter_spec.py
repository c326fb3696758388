"""--arbiter parsing and the fencing clock's arithmetic (no etcd needed)."""
import pytest

from colocore.arbiter import parse_arbiter
from colocore.arbiter.fence import DRIFT, RELEASE_ALLOWANCE, FencingClock, margin, safe_until
from colocore.errors import ColocoreError


def test_spec_full():
    s = parse_arbiter("etcd:http://10.0.0.3:2379|http://10.0.0.4:2379,key=/colocore/kv,ttl=3000,"
                      "role=standby,protect=auto,advertise=tcp:10.0.0.5:5555")
    assert s.endpoints == [("10.0.0.3", 2379), ("10.0.0.4", 2379)]
    assert (s.key, s.ttl_ms, s.ttl_s, s.role, s.protect) == ("/colocore/kv", 3000, 3, "standby", "auto")
    assert s.state_key == "/colocore/kv/state"
    assert s.standby_prefix == "/colocore/kv/standby/"
    assert parse_arbiter(s.text()) == s


def test_spec_defaults():
    s = parse_arbiter("etcd:http://h,key=/k")
    assert (s.endpoints, s.ttl_ms, s.role, s.protect, s.advertise) == ([("h", 2379)], 2000, "serve",
                                                                       "manual", None)


@pytest.mark.parametrize("text, words", [
    ("zookeeper:http://h:1,key=/k", "only etcd"),
    ("etcd:h:2379,key=/k", "etcd client URL"),
    ("etcd:http://h:2379", "key=KEY is missing"),
    ("etcd:http://h:2379,key=k", "leading /"),
    ("etcd:http://h:2379,key=/k,ttl=1500", "whole seconds"),
    ("etcd:http://h:2379,key=/k,ttl=500", "whole seconds"),
    ("etcd:http://h:2379,key=/k,role=boss", "role=serve or role=standby"),
    ("etcd:http://h:2379,key=/k,protect=yes", "protect=auto"),
    ("etcd:http://h:2379,key=/k,colour=red", "unknown option"),
    ("etcd:http://h:2379,key", "not name=value"),
])
def test_spec_errors_say_what_to_do(text, words):
    with pytest.raises(ColocoreError) as e:
        parse_arbiter(text)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_margin_is_computed_from_drift_and_allowance():
    # 2 s lease: two 500 ppm clocks cost ~2 ms, plus the release allowance
    m = margin(2.0)
    assert m == pytest.approx(2.0 - 2.0 * (1 - DRIFT) / (1 + DRIFT) + RELEASE_ALLOWANCE)
    assert 0.051 < m < 0.053
    assert safe_until(10.0, 2.0) == pytest.approx(12.0 - m)


def test_fencing_clock_opens_and_closes_on_its_clock():
    now = [100.0]
    f = FencingClock(clock=lambda: now[0])
    assert not f.may_release()                 # nothing renewed yet
    f.renewed(100.0, 2)
    assert f.may_release()
    now[0] = 100.0 + 2.0 - margin(2.0) - 1e-6
    assert f.may_release()
    now[0] = 100.0 + 2.0 - margin(2.0) + 1e-6
    assert not f.may_release()                 # closed before the server could expire it
    f.vouch(now[0] + 0.5)                      # a COLO commit window covers it
    assert f.may_release()
    f.unvouch()
    assert not f.may_release()
    f.renewed(now[0], 2)
    f.revoke()                                 # the key is lost: closed for ever
    f.renewed(now[0], 2)
    f.vouch(now[0] + 10)
    assert not f.may_release()
