"""Guest-visible devices. Each device has `save() -> dict`, `check(dict) -> dict`,
`load(checked dict)` and `reset()`; the machine frames their state into the DEVICES
section (bytes as base64).

Loading is two steps so that a unit is applied whole or not at all: `check()` validates
every field of a saved state (types and ranges, before anything is allocated: a size
taken from a stream is never trusted) and raises ValueError; `load()` then only assigns
what `check()` returned and cannot fail.
"""

U8, U16, U32, U64 = (0, 0xFF), (0, 0xFFFF), (0, 0xFFFFFFFF), (0, (1 << 64) - 1)


def check_fields(state, spec, what):
    """Validate a saved state against `spec` {field: (lo, hi) for an integer,
    ("bytes", max length), or ("list", exact length) of objects the caller checks};
    return the fields. Unknown or missing fields are refused."""
    if not isinstance(state, dict):
        raise ValueError("%s: saved state is not an object" % what)
    extra = set(state) - set(spec)
    if extra:
        raise ValueError("%s: unknown field(s) %s" % (what, ", ".join(sorted(map(str, extra)))))
    out = {}
    for name, kind in spec.items():
        if name not in state:
            raise ValueError("%s: saved state lacks %r" % (what, name))
        value = state[name]
        if kind[0] == "bytes":
            if not isinstance(value, bytes) or len(value) > kind[1]:
                raise ValueError("%s: %s is not bytes of at most %d" % (what, name, kind[1]))
        elif kind[0] == "list":
            if not isinstance(value, list) or len(value) != kind[1]:
                raise ValueError("%s: %s is not a list of %d" % (what, name, kind[1]))
        elif type(value) is not int or not kind[0] <= value <= kind[1]:
            raise ValueError("%s: %s=%.40r is not an integer in %d..%d"
                             % (what, name, value, kind[0], kind[1]))
        out[name] = value
    return out
