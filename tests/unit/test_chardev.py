import pytest

from colocore.control.chardev import parse_chardev
from colocore.errors import ChardevError


def test_specs():
    s = parse_chardev("tcp:127.0.0.1:4444,server=on,wait=off")
    assert (s.kind, s.host, s.port, s.server, s.wait) == ("tcp", "127.0.0.1", 4444, True, False)
    assert parse_chardev("unix:/tmp/x.sock,server=on,wait=off").path == "/tmp/x.sock"
    assert parse_chardev("stdio").kind == "stdio"
    assert parse_chardev("none").kind == "none"
    assert parse_chardev("file:/tmp/out").path == "/tmp/out"
    assert parse_chardev("tcp::5555,server,nowait").port == 5555


@pytest.mark.parametrize("bad,msg", [
    ("tcp:localhost", "HOST:PORT"),
    ("tcp:localhost:99999", "out of range"),
    ("tcp:localhost:http", "not a number"),
    ("serial:/dev/ttyS0", "unknown backend"),
    ("unix:/tmp/x,colour=red", "unknown option"),
    ("unix:/tmp/x,server=maybe", "on or off"),
    ("", "empty"),
    ("bogus", "expected"),
])
def test_bad_specs(bad, msg):
    with pytest.raises(ChardevError, match=msg):
        parse_chardev(bad, "--console")
