"""HMP's words for the COLO primary's pause (x-colo-pause, hot pages, copy-on-write) and
for the string-valued migration parameters; hmp.py prints through these."""
from colocore.migration.params import CHOICES, TLS_PARAMETERS

STRING_PARAMETERS = TLS_PARAMETERS + tuple(CHOICES)


def format_pause(colo):
    """The `info migrate` lines of query-migrate's x-colo pause figures."""
    return ["colo pause mode: %s" % (colo["pause-mode"] or "-")] + [
        "colo last %s: %d" % (name, colo["last-" + name.replace(" ", "-")])
        for name in ("hot pages", "cow pages", "wp faults", "unchanged pages")]


def format_string_parameter(name, params):
    """QEMU quotes its string parameters (tls-creds: ''); a choice prints bare, and
    x-colo-pause says why where copy-on-write is unavailable."""
    if name in TLS_PARAMETERS:
        return "%s: '%s'" % (name, params[name])
    why = params.get(name + "-unavailable")
    return "%s: %s%s" % (name, params[name], " (no userfaultfd write-protect: %s)" % why if why else "")
