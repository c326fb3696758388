"""Scenario parsing: every mistake is found before anything starts, with its line."""
import pytest

from colocore.tools.script import ScriptError, parse


def test_a_full_scenario():
    steps = parse("""
# comment
set PORT 5555
node sec run -m 256M --incoming tcp:127.0.0.1:${PORT}
node pri attach unix:/run/p.sock qmp=unix:/run/q.sock console=unix:/run/c.sock
@pri migrate_set_capability x-colo on
@pri? migrate tcp:127.0.0.1:$PORT
wait @pri colo 60
wait @sec COLO_EXIT
expect @pri ^x-colo: on$
console @pri SET a b c
sleep 0.5
kill @sec
""")
    assert [s.op for s in steps] == ["start", "attach", "hmp", "hmp", "wait", "wait", "expect",
                                     "console", "sleep", "kill"]
    assert steps[0].args == ["-m", "256M", "--incoming", "tcp:127.0.0.1:5555"]
    assert steps[1].options == {"qmp": "unix:/run/q.sock", "console": "unix:/run/c.sock"}
    assert steps[3].text == "migrate tcp:127.0.0.1:5555" and steps[3].tolerate_error
    assert steps[4].seconds == 60 and steps[5].seconds == 30
    assert steps[7].text == "SET a b c"
    assert steps[0].lineno == 4


def test_free_port():
    steps = parse("set P free-port\nnode a run --incoming tcp:127.0.0.1:$P\n")
    port = int(steps[0].args[1].rsplit(":", 1)[1])
    assert 0 < port < 65536


@pytest.mark.parametrize("text, message", [
    ("fly away", "line 1: unknown step 'fly'"),
    ("\n\n@a info status", "line 3: node 'a' is not declared"),
    ("node a run\nnode a run", "line 2: node 'a' is declared twice"),
    ("node a walk", "line 1: usage: node NAME run"),
    ("node a run --monitor x", "line 1: --monitor is set by the script itself"),
    ("node a attach", "line 1: node a attach needs the monitor address"),
    ("node a attach unix:/x colour=red", "line 1: unknown attach option"),
    ("node a attach ftp:/x", "address 'ftp:/x'"),
    ("node a run\n@a", "line 2: an HMP command is missing"),
    ("sleep soon", "line 1: sleep 'soon' is not a number"),
    ("sleep", "line 1: usage: sleep SECONDS"),
    ("node a run\nwait @a", "line 2: usage: wait @NODE STATUS"),
    ("node a run\nwait @a sideways", "line 2: unknown status 'sideways'"),
    ("node a run\nwait @a colo never", "line 2: timeout 'never' is not a number"),
    ("node a run\nexpect @a (", "line 2: bad regular expression"),
    ("node a run\nexpect a x", "line 2: expect needs @NODE"),
    ("node a attach unix:/m\nkill @a", "line 2: kill @a: the script only kills nodes it started"),
    ("node a run\nconsole @a", "line 2: usage: console @NODE LINE"),
    ("node a run --incoming $PORT", "line 1: unknown variable $PORT"),
    ("set 1x y", "line 1: usage: set NAME VALUE"),
    ('node a run --append "unclosed', "line 1: No closing quotation"),
])
def test_syntax_errors_name_the_line(text, message):
    with pytest.raises(ScriptError) as e:
        parse(text)
    assert message in str(e.value)
