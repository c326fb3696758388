"""Coverage-guided (atheris) fuzzing of the unit reader and apply against a real Machine
(KVM, in this process): colocore.vmstate.unit.read_unit, check, apply.

    python tests/fuzz/fuzz_unit.py CORPUS_DIR [SEED_DIR] -max_total_time=N

An input is a colocore stream: a snapshot (MACHINE ... END) or a checkpoint (CHECKPOINT
... END, then its device part ... END). The custom mutator keeps the framing and
recomputes the CRCs, so mutations reach the decoders. Refusing a unit (StreamError,
ColocoreError) is the expected outcome; any other exception, or apply failing on a unit
that passed check (a half-applied unit), is a finding: saved to $FUZZ_FINDINGS with its
input, and fatal only if its signature is not among the known ones (tests/fuzz/findings);
FUZZ_COLLECT=1 makes none fatal (to gather them), FUZZ_REPLAY=1 every one (to replay a
reproducer: `fuzz_unit.py FILE`). An empty corpus dir is seeded with a snapshot and a
checkpoint of a booted kvstore machine (gen-*).
"""
import json
import os
import random
import resource
import sys
import traceback

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), HERE]

import streams  # noqa: E402

with atheris.instrument_imports(include=["colocore.vmstate", "colocore.vm"]):
    from colocore.errors import ColocoreError
    from colocore.vm.machine import Machine
    from colocore.vmstate import format as stream, unit as units
    from colocore.vmstate.format import Section
    from colocore.vmstate.sections import BATCH_PAGES, PAGE

MEM = 16 << 20
ADDRESS_SPACE = 3 << 30
FINDINGS = os.environ.get("FUZZ_FINDINGS", "/tmp/colocore-findings")
KNOWN = os.path.join(HERE, "findings")

machine = None
found = set()


def _machine():
    global machine
    if machine is None:
        machine = Machine(MEM, "fuzz")
        machine.boot("kvstore")
    return machine


def seeds():
    """A snapshot and a checkpoint of a booted (never run) kvstore machine."""
    m = _machine()
    snap = [stream.header()]
    w = units.UnitWriter(snap.append)
    w.json(Section.MACHINE, m.machine_info())
    w.pages(m.memory.ram, m.memory.all_pages()[:64], bytearray(BATCH_PAGES * PAGE), True, zero=True)
    w.vcpu_and_devices(m.vcpu.get_state(), m.device_states())
    w.end()
    cp = [stream.header()]
    w = units.UnitWriter(cp.append)
    w.json(Section.CHECKPOINT, {"id": 1, "dirty": 8, "zero": 0})
    w.pages(m.memory.ram, m.memory.all_pages()[256:264], bytearray(BATCH_PAGES * PAGE), False)
    w.end()
    w.vcpu_and_devices(m.vcpu.get_state(), m.device_states())
    w.end()
    return {"snapshot": b"".join(snap), "checkpoint": b"".join(cp)}


def _split_all(data):
    secs, pos = streams.split_sections(data)
    more, _ = streams.split_sections(data, pos)
    return secs + more


def mutator(data, max_size, seed):
    rng = random.Random(seed)
    secs = _split_all(data)
    if not secs:
        return atheris.Mutate(data, max_size)
    if rng.random() < 0.5:
        i = rng.randrange(len(secs))
        kind, payload = secs[i]
        secs[i] = (kind, atheris.Mutate(payload, max(len(payload) * 2, 64)))
        out = streams.join(secs)
    else:
        secs, tail = streams.mutate_sections(secs, rng)
        out = streams.render(secs, tail)
    return out[:max_size]


def known():
    from fuzz_streams import core, known_signatures
    return known_signatures(KNOWN), core


KNOWN_SIGS, core = known()


def _signature(what, exc):
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/colocore/" in f.filename]
    where = ""
    if frames:
        f = frames[-1]
        where = "%s:%s" % (f.filename[f.filename.rindex("/colocore/") + 1:], f.name)
    return "%s %s %s" % (what, type(exc).__name__, where)


def _finding(what, exc, data):
    sig = _signature(what, exc)
    if sig in found:
        return
    found.add(sig)
    os.makedirs(FINDINGS, exist_ok=True)
    import hashlib
    name = "unit-%s" % hashlib.sha1(sig.encode()).hexdigest()[:10]
    with open(os.path.join(FINDINGS, name + ".bin"), "wb") as f:
        f.write(data)
    with open(os.path.join(FINDINGS, name + ".json"), "w") as f:
        json.dump({"mode": "unit", "what": what, "signature": sig,
                   "detail": "".join(traceback.format_exception(exc))[-3000:]}, f, indent=1)
    print("finding %s: %s" % (name, sig), flush=True)
    is_known = core(sig) in KNOWN_SIGS
    if os.environ.get("FUZZ_REPLAY") or (not is_known and not os.environ.get("FUZZ_COLLECT")):
        raise RuntimeError("%s finding: %s" % ("known" if is_known else "new", sig)) from exc


def one(data):
    m = _machine()
    r = stream.bytes_reader(data, "fuzzed unit")
    try:
        r.read_header()
        kind, _ = streams.split_sections(data)[0][0] if streams.split_sections(data)[0] else (0, b"")
        if kind == Section.CHECKPOINT:
            unit = units.read_unit(r, "checkpoint", npages=m.memory.npages, ram=m.memory.ram)
            units.read_unit(r, "device part", npages=m.memory.npages, unit=unit)
            if unit.cpu is None or unit.devices is None:
                return
        else:
            unit = units.read_unit(r, "snapshot", npages=m.memory.npages)
            if unit.info["mem_size"] != m.mem_size:
                return
        units.check(unit, m, "fuzzed unit")
    except ColocoreError:
        return                       # refused whole, nothing touched: as it should be
    except Exception as exc:  # noqa: BLE001 - what escapes the reader is the finding
        _finding("exception escaped", exc, data)
        return
    try:
        units.apply(unit, m)
    except Exception as exc:  # noqa: BLE001
        _finding("partial apply", exc, data)


def main():
    args = sys.argv[1:]
    # A unit that makes the decoder allocate gigabytes is a finding, not the end of the
    # run: with the address space capped, the allocation fails with MemoryError.
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    if args and not args[0].startswith("-") and not os.path.isfile(args[0]):
        os.makedirs(args[0], exist_ok=True)
        if not os.listdir(args[0]):
            for name, blob in seeds().items():
                with open(os.path.join(args[0], "gen-" + name), "wb") as f:
                    f.write(blob)
    atheris.Setup([sys.argv[0]] + args, one, custom_mutator=mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
