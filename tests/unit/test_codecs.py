"""The page codecs: Cython (colocore_ext) and the plain-Python reference, same test bodies."""
import array
import os
import random
import types

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from colocore_ext import lz4batch, pages, xbzrle
from tests.unit import reference_codecs as ref

PAGE = 4096
GUARD = b"\xa5" * 64

COMPILED = types.SimpleNamespace(
    name="compiled", encode=xbzrle.encode, decode=xbzrle.decode,
    compress=lz4batch.compress, decompress=lz4batch.decompress,
    gather=pages.gather, scatter=pages.scatter, is_zero_page=pages.is_zero_page,
    page_hashes=pages.page_hashes)
REFERENCE = types.SimpleNamespace(
    name="reference", encode=ref.encode, decode=ref.decode,
    compress=ref.compress, decompress=ref.decompress,
    gather=ref.gather, scatter=ref.scatter, is_zero_page=ref.is_zero_page,
    page_hashes=ref.page_hashes)


@pytest.fixture(params=[COMPILED, REFERENCE], ids=lambda c: c.name)
def codec(request):
    return request.param


IMPLS = pytest.mark.parametrize("codec", [COMPILED, REFERENCE], ids=lambda c: c.name)
HYP = settings(max_examples=60, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_the_compiled_modules_are_loaded():
    for mod in (xbzrle, pages, lz4batch):
        assert mod.__file__.endswith(".so"), mod.__file__
    assert type(xbzrle.encode).__name__ in ("cython_function_or_method",
                                            "builtin_function_or_method")
    assert lz4batch.LIBRARY and lz4batch.LZ4_VERSION >= 10900


# ---- XBZRLE ---------------------------------------------------------------------------------

def _guarded_page(data):
    """(backing bytearray, writable view of the page in the middle of guard bytes)."""
    buf = bytearray(GUARD + bytes(data) + GUARD)
    return buf, memoryview(buf)[len(GUARD):len(GUARD) + len(data)]


def _roundtrip(codec, old, new):
    out = bytearray(PAGE)
    n = codec.encode(new, old, out)
    if n < 0:
        return n
    buf, page = _guarded_page(old)
    codec.decode(bytes(out[:n]), page)
    assert bytes(page) == bytes(new)
    assert buf[:64] == GUARD and buf[-64:] == GUARD
    return n


def _mutate(old, edits):
    new = bytearray(old)
    for off, data in edits:
        off %= PAGE
        chunk = data[:PAGE - off]
        new[off:off + len(chunk)] = chunk
    return bytes(new)


def _make_page(seed, kind):
    if kind == 0:
        return bytes(PAGE)
    if kind == 1:
        return bytes(range(256)) * (PAGE // 256)
    return random.Random(seed).randbytes(PAGE)


page_bytes = st.builds(_make_page, st.integers(0, 2 ** 32), st.integers(0, 2))
edits = st.lists(st.tuples(st.integers(0, PAGE - 1), st.binary(min_size=1, max_size=80)),
                 max_size=40)


@IMPLS
@HYP
@given(old=page_bytes, edit_list=edits)
def test_delta_round_trip_random_pairs(codec, old, edit_list):
    new = _mutate(old, edit_list)
    n = _roundtrip(codec, old, new)
    if new == old:
        assert n == 0


@HYP
@given(old=page_bytes, edit_list=edits)
def test_delta_encoding_is_identical_in_both(old, edit_list):
    new = _mutate(old, edit_list)
    a, b = bytearray(PAGE), bytearray(PAGE)
    na, nb = xbzrle.encode(new, old, a), ref.encode(new, old, b)
    assert na == nb
    if na > 0:
        assert a[:na] == b[:nb]


def test_identical_pages_cost_nothing(codec):
    page = os.urandom(PAGE)
    assert codec.encode(page, page, bytearray(PAGE)) == 0
    assert codec.encode(bytes(PAGE), bytes(PAGE), bytearray(0)) == 0
    buf, view = _guarded_page(page)
    codec.decode(b"", view)
    assert bytes(view) == page


def test_pages_differing_everywhere_overflow(codec):
    old = bytes(PAGE)
    new = bytes([1]) * PAGE
    assert codec.encode(new, old, bytearray(2 * PAGE)) == -1


def test_alternating_bytes_overflow(codec):
    old = bytes(PAGE)
    new = bytes([0, 7]) * (PAGE // 2)
    assert codec.encode(new, old, bytearray(PAGE)) == -1


@pytest.mark.parametrize("where", [[0], [PAGE - 1], [0, PAGE - 1], list(range(PAGE - 20, PAGE)),
                                   list(range(0, 200)), [127, 128, 16383 % PAGE]])
def test_runs_at_page_edges(codec, where):
    old = bytes(range(256)) * (PAGE // 256)
    new = bytearray(old)
    for i in where:
        new[i] ^= 0xFF
    assert _roundtrip(codec, old, bytes(new)) > 0


def test_long_runs_use_multibyte_lengths(codec):
    old = bytes(PAGE)
    new = bytearray(old)
    new[3000:3200] = b"\x01" * 200            # zero run 3000 (2 ULEB bytes), change run 200
    n = _roundtrip(codec, old, bytes(new))
    assert n == 2 + 2 + 200


def test_overflow_when_out_is_too_small(codec):
    old = bytes(PAGE)
    new = bytearray(old)
    new[10:20] = b"x" * 10
    assert codec.encode(bytes(new), old, bytearray(12)) == 12
    assert codec.encode(bytes(new), old, bytearray(11)) == -1


MALFORMED = [
    (b"\x00\x00", "zero-length change run"),
    (b"\x01", "truncated: zero run without change run"),
    (b"\x00\x05abc", "change run past the end of the delta"),
    (b"\x80\x20\x01x", "zero run past the page (4096)"),
    (b"\x81\x20\x01x", "zero run of 4097"),
    (b"\xff\x1f\x02xy", "change run crossing the page end"),
    (b"\x00\x81\x20" + b"x" * 4097, "change run longer than the page"),
    (b"\x00\x01x\x00\x01y", "zero-length zero run after the first record"),
    (b"\x00\x01x\x05", "trailing garbage"),
    (b"\x80\x00\x01x", "non-minimal ULEB128"),
    (b"\x80\x80\x80\x01\x01x", "over-long ULEB128"),
    (b"\xff\x1f\x01x" + b"\x01\x01y", "record after the page end"),
]


@pytest.mark.parametrize("delta,why", MALFORMED, ids=[w for _, w in MALFORMED])
def test_malformed_delta_is_rejected_and_nothing_written(codec, delta, why):
    old = os.urandom(PAGE)
    buf, view = _guarded_page(old)
    with pytest.raises(ValueError):
        codec.decode(delta, view)
    assert bytes(buf) == GUARD + old + GUARD


@IMPLS
@HYP
@given(delta=st.binary(max_size=64), old=st.binary(min_size=64, max_size=64))
def test_random_delta_never_writes_outside(codec, delta, old):
    buf, view = _guarded_page(old)
    try:
        codec.decode(delta, view)
        ok = True
    except ValueError:
        ok = False
        assert bytes(view) == old
    assert buf[:64] == GUARD and buf[-64:] == GUARD
    # both implementations agree on what is well formed, and on the result
    other = bytearray(old)
    try:
        (ref.decode if codec is COMPILED else xbzrle.decode)(delta, other)
        assert ok and bytes(other) == bytes(view)
    except ValueError:
        assert not ok


def test_bad_page_arguments():
    with pytest.raises(ValueError):
        xbzrle.encode(bytes(PAGE), bytes(PAGE - 1), bytearray(PAGE))
    with pytest.raises(ValueError):
        xbzrle.decode(b"\x00\x01x", bytearray(0))
    with pytest.raises((TypeError, BufferError)):
        xbzrle.decode(b"\x00\x01x", b"read-only")


def test_batches_match_single_pages():
    rnd = random.Random(5)
    old = bytearray(os.urandom(8 * PAGE))
    new = bytearray(old)
    for p in range(8):
        for _ in range(p * 3):
            new[p * PAGE + rnd.randrange(PAGE)] ^= 0x5A
    new[7 * PAGE:] = os.urandom(PAGE)                    # overflows
    out = bytearray(8 * PAGE)
    lengths = array.array("i", [0] * 8)
    used = xbzrle.encode_batch(new, old, out, lengths)
    assert lengths[0] == 0 and lengths[7] == -1
    assert used == sum(n for n in lengths if n > 0)
    target = bytearray(old)
    xbzrle.decode_batch(bytes(out[:used]), lengths, target)
    for p in range(7):
        assert target[p * PAGE:(p + 1) * PAGE] == new[p * PAGE:(p + 1) * PAGE]
    # one malformed delta: nothing at all is applied
    bad = bytearray(out[:used])
    bad[-1:] = b""
    target = bytearray(old)
    with pytest.raises(ValueError):
        xbzrle.decode_batch(bytes(bad), lengths, target)
    with pytest.raises(ValueError):
        lengths2 = array.array("i", lengths)
        lengths2[1] += 1                                  # lengths no longer add up
        xbzrle.decode_batch(bytes(out[:used]), lengths2, target)
    assert target == old


@pytest.mark.parametrize("size", [0, 4096, 65536 + 4096, 3 << 20, -1, 1 << 41, 2.0, True])
def test_cache_size_validation(size):
    with pytest.raises((ValueError, TypeError)):
        xbzrle.XbzrleCache(size)


def test_cache_encode_pages():
    cache = xbzrle.XbzrleCache(64 * 1024)                 # 16 slots
    page = bytearray(os.urandom(PAGE))
    pfns = array.array("I", [3])
    out = bytearray(PAGE)
    lengths = array.array("i", [0])
    assert cache.encode_pages(pfns, page, out, lengths) == 0 and lengths[0] == -1   # miss
    assert bytes(cache.lookup(3)) == bytes(page)
    page[100] ^= 1
    used = cache.encode_pages(pfns, page, out, lengths)
    assert lengths[0] == used > 0
    assert bytes(cache.lookup(3)) == bytes(page)
    assert cache.encode_pages(pfns, page, out, lengths) == 0 and lengths[0] == 0
    # pfn 19 maps to the same slot; pfn 3 was sent this generation, so it stays
    assert cache.insert(19, bytes(PAGE)) is False
    cache.advance(); cache.advance()
    assert cache.insert(19, bytes(PAGE)) is True and cache.lookup(3) is None
    with pytest.raises(ValueError):
        cache.encode_pages(array.array("I", [1, 2]), page, out, lengths)


# ---- lz4 ---------------------------------------------------------------------------------------

@IMPLS
@HYP
@given(data=st.one_of(st.binary(max_size=3000),
                      st.builds(lambda w, n: w * n, st.binary(min_size=1, max_size=40),
                                st.integers(1, 200))))
def test_lz4_round_trip(codec, data):
    blob = codec.compress(data)
    assert codec.decompress(blob, len(data)) == data
    # and across implementations
    other = REFERENCE if codec is COMPILED else COMPILED
    assert other.decompress(blob, len(data)) == data


def test_lz4_batch_that_does_not_shrink_is_raw(codec):
    data = os.urandom(2 * PAGE)
    blob = codec.compress(data)
    assert blob[2] == 0 and len(blob) == 8 + len(data)
    blob = codec.compress(bytes(4 * PAGE))
    assert blob[2] == 1 and len(blob) < 200


LZ4_BAD = [
    (b"", "empty"),
    (b"L4\x01\x00", "short header"),
    (b"XX\x01\x00\x10\x00\x00\x00" + b"\x00" * 10, "bad magic"),
    (b"L4\x07\x00\x10\x00\x00\x00" + b"\x00" * 10, "bad kind"),
    (b"L4\x01\x00\x11\x00\x00\x00\x10" + b"a", "wrong size"),
    (b"L4\x00\x00\x10\x00\x00\x00" + b"a" * 15, "raw too short"),
    (b"L4\x01\x00\x10\x00\x00\x00", "no payload"),
    (b"L4\x01\x00\x10\x00\x00\x00\x1fa\x00\x00", "offset 0"),
    (b"L4\x01\x00\x10\x00\x00\x00\x1fa\x09\x00", "offset past the start"),
    (b"L4\x01\x00\x10\x00\x00\x00\xf0\xff\xff", "literal length past the input"),
    (b"L4\x01\x00\x10\x00\x00\x00\x1fa\x01\x00\xff\xff\x05", "match past the output"),
]


@pytest.mark.parametrize("blob,why", LZ4_BAD, ids=[w for _, w in LZ4_BAD])
def test_lz4_malformed_input(codec, blob, why):
    with pytest.raises(ValueError):
        codec.decompress(blob, 16)


@HYP
@given(payload=st.binary(min_size=1, max_size=200), size=st.integers(0, 300))
def test_lz4_random_input_never_writes_outside(payload, size):
    blob = b"L4\x01\x00" + size.to_bytes(4, "little") + payload
    buf = bytearray(GUARD + bytes(size) + GUARD)
    view = memoryview(buf)[64:64 + size]
    try:
        lz4batch.decompress_into(blob, view)
        got = bytes(view)
        assert ref.decompress(blob, size) == got
    except ValueError:
        with pytest.raises(ValueError):
            ref.decompress(blob, size)
    assert buf[:64] == GUARD and buf[-64:] == GUARD


# ---- gather / scatter / hashes --------------------------------------------------------------

def _ram(npages, seed=3):
    rnd = random.Random(seed)
    ram = bytearray(npages * PAGE)
    for p in range(npages):
        if rnd.random() < 0.7:
            ram[p * PAGE + rnd.randrange(PAGE)] = 1 + rnd.randrange(255)
    return ram


def test_gather_scatter_round_trip(codec):
    ram = _ram(64)
    pfns = array.array("I", [0, 5, 5, 63, 17, 2, 40])
    staging = bytearray(len(pfns) * PAGE)
    kept, flags = codec.gather(ram, pfns, staging)
    nonzero = array.array("I", [p for p, z in zip(pfns, flags) if not z])
    assert kept == len(nonzero)
    for k, p in enumerate(pfns):
        assert flags[k] == codec.is_zero_page(ram[p * PAGE:(p + 1) * PAGE])
    dest = bytearray(len(ram))
    codec.scatter(dest, nonzero, staging)
    for p in nonzero:
        assert dest[p * PAGE:(p + 1) * PAGE] == ram[p * PAGE:(p + 1) * PAGE]


def test_gather_same_as_reference():
    ram = _ram(32, seed=9)
    pfns = array.array("I", range(31, -1, -1))
    a, b = bytearray(32 * PAGE), bytearray(32 * PAGE)
    ka, fa = pages.gather(ram, pfns, a)
    kb, fb = ref.gather(ram, pfns, b)
    assert (ka, fa) == (kb, fb) and a[:ka * PAGE] == b[:kb * PAGE]
    assert pages.page_hashes(ram, pfns) == ref.page_hashes(ram, pfns)
    assert pages.fill_zero(ram, pfns) is None and pages.is_zero_page(ram)


def test_page_hashes_tell_pages_apart(codec):
    ram = bytearray(4 * PAGE)
    ram[PAGE + 5] = 1
    ram[2 * PAGE + 6] = 1
    h = codec.page_hashes(ram, array.array("I", [0, 1, 2, 3]))
    assert h[0] == h[3] and len({h[0], h[1], h[2]}) == 3


def test_bad_page_lists_and_buffers(codec):
    ram = _ram(8)
    staging = bytearray(4 * PAGE)
    before = bytes(staging)
    with pytest.raises(IndexError):
        codec.gather(ram, array.array("I", [1, 8]), staging)
    with pytest.raises(IndexError):
        codec.scatter(bytearray(8 * PAGE), array.array("I", [0xFFFFFFFF]), staging)
    with pytest.raises(ValueError):
        codec.gather(ram, array.array("I", range(5)), staging)      # staging too small
    with pytest.raises(ValueError):
        codec.gather(ram[:-1], array.array("I", [0]), staging)      # not whole pages
    with pytest.raises(ValueError):
        codec.gather(ram, array.array("I", [0]), bytearray(PAGE + 1))
    with pytest.raises(ValueError):
        codec.scatter(bytearray(8 * PAGE), array.array("I", [0, 1]), bytearray(PAGE))
    assert bytes(staging) == before


def test_compiled_rejects_wrong_types():
    with pytest.raises((TypeError, ValueError)):
        pages.gather(bytearray(PAGE), array.array("Q", [0]), bytearray(PAGE))
    with pytest.raises((TypeError, BufferError)):
        pages.gather(bytearray(PAGE), array.array("I", [0]), bytes(PAGE))   # read-only
