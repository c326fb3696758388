"""The checkpoint pause's RAM capture (colocore_ext.capture) against a real guest.

The property: whatever the pause mode (hot pages kept writable, pre-copy between
checkpoints, copy-on-write after the pause) and however the guest's writes race the
copier, (1) every page of a checkpoint's list holds exactly what guest RAM held at the
pause, compared page by page with a stop-the-world copy taken inside that same pause, and
(2) every page that changed between two pauses is in the second one's list: no write is
ever missed. Hot pages the capture decides not to send must equal what was sent before.
"""
import random
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from colocore.colo.checkpoint import checkpoint_pause
from colocore.vm.machine import Machine
from colocore_ext import capture, pages

pytestmark = pytest.mark.kvm
MEM = 64 << 20
NPAGES = MEM // 4096
REGION = (16 << 20) // 4096          # where the dirtier's pages start
SPAN = 4096                          # the random pattern's pages: REGION .. REGION + SPAN


@pytest.fixture(scope="module")
def machine():
    """One running dirtier guest for the module: it writes 1,500 random pages of a
    16 MiB span per pass, forever (and prints progress through the virtio console, so
    the VMM writes guest RAM on the vCPU thread too)."""
    m = Machine(MEM, "capture-test", on_event=lambda *a: None)
    try:
        m.boot("dirtier", "pattern=random wss=1500 span=%d" % SPAN)
        m.console_out.attach(lambda fn, *a: None)
        m.serial_out.attach(lambda fn, *a: None)
        m.start_thread()
        m.resume()
        time.sleep(0.3)
        yield m
    finally:
        m.close()


def _fresh_capture(m, **kw):
    """A capture that starts from a clean dirty log (as COLO starts after the initial
    migration's last harvest)."""
    was = m.park_quietly()
    try:
        m.memory.harvest()
    finally:
        m.unpark_quietly(was)
    cap = capture.Capture(m.memory.dirty, **kw)
    assert cap.cow_ready or not kw.get("cow", True), cap.cow_reason
    cap.reserve(NPAGES)
    return cap


class Checker:
    """Takes the reference copy inside each pause and checks the two properties."""

    def __init__(self, m, cap):
        self.m, self.cap = m, cap
        self.prev = None                  # page hashes at the previous pause
        self.prev_bytes = None
        self.all = m.memory.all_pages()

    def pause(self, hold=False):
        ref = {}

        def in_pause():                   # the guest is stopped: this is the pause state
            ref["ram"] = bytes(self.m.memory.ram)
            ref["cpu"] = self.m.vcpu.get_state()
        if hold:
            self.cap.hold_copier(True)
        cpu, pause_s, in_loop = checkpoint_pause(self.m, self.cap, in_pause)
        return ref, cpu, in_loop

    def check(self, ref):
        cap = self.cap
        cap.wait_copied()
        skipped = cap.compare_hot()
        nonzero, zero = cap.plan_send()
        pfns = cap.pfns()
        ram = ref["ram"]
        wrong = [p for k, p in enumerate(pfns) if cap.page(k) != ram[p * 4096:(p + 1) * 4096]]
        assert not wrong, "%d staged pages differ from the pause (first: %s; kinds %s)" % (
            len(wrong), wrong[:5], sorted({cap.kinds()[list(pfns).index(p)] for p in wrong}))
        hashes = pages.page_hashes(ram, self.all)
        if self.prev is not None:
            listed = set(pfns)
            missed = [p for p in range(NPAGES) if hashes[p] != self.prev[p] and p not in listed]
            assert not missed, "%d pages changed but are not in the checkpoint: %s" % (
                len(missed), missed[:8])
        sent = set(nonzero) | set(zero)
        assert len(sent) + skipped == len(pfns)
        for p in set(pfns) - sent:        # not sent: the secondary's copy must be this
            assert self.prev_bytes[p * 4096:(p + 1) * 4096] == ram[p * 4096:(p + 1) * 4096]
        self.prev, self.prev_bytes = hashes, ram
        return pfns


round_plan = st.lists(st.tuples(
    st.integers(0, 3),                    # pre-copy passes before the pause
    st.floats(0.0, 0.03),                 # guest time between them
    st.booleans(),                        # hold the copier (the guest races it)
    st.booleans()),                       # a VMM write into a page not yet copied
    min_size=3, max_size=6)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=round_plan, cow=st.booleans(), hot=st.booleans(), min_run=st.sampled_from([1, 8, 128]))
def test_every_checkpoint_is_exactly_the_pause_state(machine, plan, cow, hot, min_run):
    m = machine
    cap = _fresh_capture(m, cow=cow, hot_max=16384 if hot else 0, min_run=min_run)
    cap.precopy_min = 16
    chk = Checker(m, cap)
    rnd = random.Random(len(plan) * 31 + min_run)
    try:
        for passes, gap, hold, vmm_write in plan:
            for _ in range(passes):
                time.sleep(gap)
                cap.precopy()
            time.sleep(gap)
            ref, cpu, in_loop = chk.pause(hold=hold)
            assert in_loop
            if hold and vmm_write and cow:
                # The VMM writes a page that is write-protected and not copied yet (GIL
                # held, as device emulation does): the fault handler must copy the page
                # first, so the checkpoint keeps the old bytes; the mark puts the new
                # ones into the next checkpoint.
                kinds, pfns = cap.kinds(), cap.pfns()
                cow_pages = [p for k, p in enumerate(pfns) if kinds[k] == 3]
                if cow_pages:
                    p = rnd.choice(cow_pages)
                    m.memory.ram[p * 4096 + 100:p * 4096 + 108] = rnd.getrandbits(64).to_bytes(8, "little")
                    m.memory.mark_dirty(p * 4096 + 100, 8)
            if hold:
                time.sleep(0.02)          # the guest writes protected pages meanwhile
                cap.hold_copier(False)
            chk.check(ref)
    finally:
        cap.close()


def test_captured_vcpu_state_is_the_one_at_the_pause(machine):
    """The run loop reads regs/sregs/events from kvm_run's sync area and the rest by
    ioctl on the vCPU thread: the same blobs as get_state() at that moment (only the
    TSC moves between the two reads)."""
    cap = _fresh_capture(machine)
    try:
        chk = Checker(machine, cap)
        for _ in range(3):
            time.sleep(0.01)
            ref, cpu, in_loop = chk.pause()
            assert in_loop
            want = ref["cpu"]
            assert set(cpu) == set(want)
            for name in want:
                if name != "msrs":
                    assert cpu[name] == want[name], name
            assert len(cpu["msrs"]) == len(want["msrs"])
            chk.check(ref)
    finally:
        cap.close()


def test_device_writes_on_the_vcpu_thread_fault_into_the_handler(machine):
    """The console's used ring is written by the VMM on the vCPU thread (GIL held) when
    the guest prints. With every dirty page write-protected (min_run 1) and the copier
    held for longer than the guest's print period, those writes land on pages not yet
    copied: the handler copies them first, the checkpoint is still the pause state."""
    cap = _fresh_capture(machine, hot_max=0, min_run=1)
    try:
        chk = Checker(machine, cap)
        ref, _, _ = chk.pause()
        chk.check(ref)
        before = cap.fault_copies
        for _ in range(3):
            time.sleep(0.05)
            ref, _, _ = chk.pause(hold=True)
            time.sleep(0.25)              # > the 200 ms between the guest's progress lines
            cap.hold_copier(False)
            chk.check(ref)
        assert cap.fault_copies > before, "no write faulted into the handler"
    finally:
        cap.close()


def test_close_lifts_every_protection(machine):
    """Closing with pages still protected (copier held) must leave none protected: a
    write from this thread to each of them completes."""
    cap = _fresh_capture(machine, hot_max=0, min_run=1)
    chk = Checker(machine, cap)
    ref, _, _ = chk.pause(hold=True)
    kinds, pfns = cap.kinds(), cap.pfns()
    protected = [p for k, p in enumerate(pfns) if kinds[k] == 3]
    assert protected
    cap.close()
    done = threading.Event()

    def write_all():
        ram = machine.memory.ram
        for p in protected:
            ram[p * 4096 + 200] = ram[p * 4096 + 200]
        done.set()
    threading.Thread(target=write_all, daemon=True).start()
    assert done.wait(10), "a write blocked: a page stayed write-protected after close()"


def test_pause_without_copy_on_write_copies_everything(machine):
    cap = _fresh_capture(machine, cow=False)
    try:
        assert not cap.cow_ready and cap.cow_reason
        chk = Checker(machine, cap)
        for _ in range(3):
            time.sleep(0.02)
            ref, _, _ = chk.pause()
            assert set(cap.kinds()) <= {1, 2, 4}      # hot, pause, pre: nothing deferred
            chk.check(ref)
    finally:
        cap.close()


def test_uffd_wp_support_says_what_is_missing():
    ok, features, reason = capture.uffd_wp_support()
    assert isinstance(ok, bool) and isinstance(reason, str)
    assert ok == (reason == "")
    if ok:
        assert features & 1               # UFFD_FEATURE_PAGEFAULT_FLAG_WP


def test_copier_rearms_dirty_logging_before_it_unprotects():
    """Rule 1 of the capture: a page the copier un-protects must already have its dirty
    bit cleared, or the guest's next write (it waits for exactly that page) is erased by
    a late clear and never reaches a checkpoint. A guest that writes pages rarely (each
    about every 20 passes) and a copier racing it make such a write likely in each round."""
    m = Machine(MEM, "capture-order", on_event=lambda *a: None)
    try:
        m.boot("dirtier", "pattern=random wss=300 span=12000")
        m.console_out.attach(lambda fn, *a: None)
        m.serial_out.attach(lambda fn, *a: None)
        m.start_thread()
        m.resume()
        time.sleep(0.2)
        cap = _fresh_capture(m, hot_max=0, min_run=1)
        try:
            chk = Checker(m, cap)
            for _ in range(25):
                time.sleep(0.004)
                ref, _, _ = chk.pause()
                chk.check(ref)
        finally:
            cap.close()
    finally:
        m.close()
