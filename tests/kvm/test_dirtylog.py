"""Dirty logging against a real guest: KVM's log + the software bitmap, word-at-a-time."""
import random

import pytest

from colocore.tools.bench.pipeline import PageWritingGuest
from colocore_ext import dirtylog

pytestmark = pytest.mark.kvm
SLOT = 64 << 20
NPAGES = SLOT // 4096


@pytest.fixture(params=[True, False], ids=["manual-protect", "plain-get"])
def guest(request):
    with PageWritingGuest(SLOT, manual_protect=request.param) as g:
        yield g


def test_harvest_sees_exactly_the_guest_writes(guest):
    log = guest.dirty_log()
    first = log.harvest()
    if guest.manual_protect:
        assert len(first) == NPAGES          # INITIALLY_SET: everything starts dirty
    guest.write_pages([])
    assert len(log.harvest()) == 0
    rnd = random.Random(7)
    for n in (1, 63, 64, 65, 1000, NPAGES):
        dirty = sorted(rnd.sample(range(NPAGES), n))
        guest.write_pages(dirty)
        assert list(log.harvest()) == dirty
        assert len(log.harvest()) == 0       # re-protected: nothing new without writes
    guest.write_pages([0, 63, 64, NPAGES - 1])
    assert list(log.harvest()) == [0, 63, 64, NPAGES - 1]


def test_software_bitmap_is_merged(guest):
    log = guest.dirty_log()
    log.harvest()
    log.mark(5)
    log.mark_range(guest.SLOT_GPA + 10 * 4096 + 100, 2 * 4096)   # touches pages 10, 11, 12
    assert log.count() == 4
    guest.write_pages([7, 11])
    assert list(log.harvest()) == [5, 7, 10, 11, 12]
    assert log.count() == 0 and len(log.harvest()) == 0


def test_bad_marks_and_arguments(guest):
    log = guest.dirty_log()
    with pytest.raises(IndexError):
        log.mark(NPAGES)
    with pytest.raises(IndexError):
        log.mark_range(guest.SLOT_GPA + SLOT - 10, 20)
    with pytest.raises(IndexError):
        log.mark_range(0, 4096)               # below the slot
    for args in ((guest.vm.fd, 1, guest.mem, 4095), (guest.vm.fd, 1, guest.mem + 1, SLOT),
                 (-1, 1, guest.mem, SLOT), (guest.vm.fd, 1, guest.mem, 0)):
        with pytest.raises(ValueError):
            dirtylog.DirtyLog(*args)


def test_slot_without_dirty_logging_is_a_clear_error(guest):
    log = dirtylog.DirtyLog(guest.vm.fd, 0, guest.vm.mem_addr, guest.LOW_SIZE)   # slot 0: no logging
    with pytest.raises(OSError, match="KVM_MEM_LOG_DIRTY_PAGES"):
        log.harvest()
