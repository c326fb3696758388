"""Coverage-guided (atheris) differential fuzzers of the monitors' framers.

    python tests/fuzz/fuzz_framers.py qmp|hmp CORPUS_DIR -max_total_time=N

qmp: control/qmp.py's JsonFramer against the byte-by-byte reference (every chunking, any
size limit), and every framed text through the session's JSON parsing, which may refuse
it only with the errors it answers (finding 'JSON nested 1,000-1,024 deep raises outside
the handler'). hmp: control/hmp.py's LineReader against a plain split on newlines.
"""
import json
import os
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), HERE]

with atheris.instrument_imports(include=["colocore.control"]):
    from colocore.control import hmp as hmp_mod
    from colocore.control import jsonframer as qmp_mod

import reference_framer  # noqa: E402


def _chunks(fdp, data):
    cuts = sorted(fdp.ConsumeIntInRange(0, len(data)) for _ in range(fdp.ConsumeIntInRange(0, 6)))
    out, prev = [], 0
    for c in cuts + [len(data)]:
        out.append(data[prev:c])
        prev = c
    return out


def _norm(items):
    return [i if isinstance(i, bytes) else ("error", i.desc) for i in items]


def qmp_one(raw):
    fdp = atheris.FuzzedDataProvider(raw)
    limit = fdp.PickValueInList([4, 16, 64, 1 << 20])
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    fast, ref = qmp_mod.JsonFramer(limit), reference_framer.JsonFramer(limit)
    got, want = [], []
    for chunk in _chunks(atheris.FuzzedDataProvider(raw[:16]), data):
        got += _norm(fast.feed(chunk))
        want += _norm(ref.feed(chunk))
    if got != want:
        raise AssertionError("framers differ on %r (limit %d):\n fast %r\n  ref %r"
                             % (data[:200], limit, got[:10], want[:10]))
    for item in got:
        if isinstance(item, bytes):
            try:
                json.loads(item.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                pass       # each is answered by QmpSession.handle


def _ref_lines(data, max_line):
    *complete, rest = data.split(b"\n")
    out = [hmp_mod.TOO_LONG if len(l) > max_line else l.decode("utf-8", "replace").rstrip("\r")
           for l in complete]
    if len(rest) > max_line:
        out.append(hmp_mod.TOO_LONG)
    return out


def hmp_one(raw):
    fdp = atheris.FuzzedDataProvider(raw)
    max_line = fdp.ConsumeIntInRange(1, 64)
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    reader = hmp_mod.LineReader(max_line)
    got = []
    for chunk in _chunks(atheris.FuzzedDataProvider(raw[:16]), data):
        reader.feed(chunk)
        while True:
            line = reader.next_line()
            if line is None:
                break
            got.append(line)
    want = _ref_lines(data, max_line)
    # a too-long last line is reported once, and its rest is dropped up to a newline
    if got != want:
        raise AssertionError("line reader differs on %r (max %d):\n got %r\nwant %r"
                             % (data[:200], max_line, got[:10], want[:10]))


def main():
    target = {"qmp": qmp_one, "hmp": hmp_one}[sys.argv[1]]
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
