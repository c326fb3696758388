"""Guest-visible devices. Each device has `save() -> dict`, `check(dict) -> dict`,
`load(checked dict)` and `reset()`; the machine frames their state into the DEVICES
section (bytes as base64).

Loading is two steps so that a unit is applied whole or not at all: `check()` validates
every field of a saved state (types and ranges, before anything is allocated: a size
taken from a stream is never trusted) and raises ValueError; `load()` then only assigns
what `check()` returned and cannot fail.
"""

U8, U16, U32, U64 = (0, 0xFF), (0, 0xFFFF), (0, 0xFFFFFFFF), (0, (1 << 64) - 1)
BOOL = ("bool",)


def check_fields(state, spec, what):
    """Validate a saved state against `spec`; return its fields. Unknown or missing fields
    are refused. A field's kind is one of:
        (lo, hi)                an integer in lo..hi
        ("bytes", n)            bytes, at most n of them
        BOOL                    true or false
        ("list", n, spec)       exactly n objects, each checked against spec
        ("object", spec)        one object, checked against spec
        a function              called with the value: returns it (or a cleaned copy),
                                raises ValueError
    """
    if not isinstance(state, dict):
        raise ValueError("%s: saved state is not an object" % what)
    extra = set(state) - set(spec)
    if extra:
        raise ValueError("%s: unknown field(s) %s" % (what, ", ".join(sorted(map(str, extra)))))
    out = {}
    for name, kind in spec.items():
        if name not in state:
            raise ValueError("%s: saved state lacks %r" % (what, name))
        out[name] = _check_value(state[name], kind, "%s %s" % (what, name))
    return out


def _check_value(value, kind, what):
    if callable(kind):
        return kind(value)
    tag = kind[0]
    if tag == "bytes":
        if not isinstance(value, bytes) or len(value) > kind[1]:
            raise ValueError("%s is not bytes of at most %d" % (what, kind[1]))
    elif tag == "bool":
        if not isinstance(value, bool):
            raise ValueError("%s is not true or false" % what)
    elif tag == "list":
        if not isinstance(value, list) or len(value) != kind[1]:
            raise ValueError("%s is not a list of %d" % (what, kind[1]))
        return [check_fields(v, kind[2], "%s[%d]" % (what, i)) for i, v in enumerate(value)]
    elif tag == "object":
        return check_fields(value, kind[1], what)
    elif type(value) is not int or not kind[0] <= value <= kind[1]:
        raise ValueError("%s=%.40r is not an integer in %d..%d" % (what, value, kind[0], kind[1]))
    return value
