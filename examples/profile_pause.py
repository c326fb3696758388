"""Where a checkpoint pause goes, step by step, and what the kernel operations under it cost.

Runs the `dirtier` guest in this process (no pair, no network) and takes checkpoints the
way the COLO primary does (colo/checkpoint.py checkpoint_pause with a Capture,
pre-copy passes between checkpoints in the modes that have them, then what the send does
first: wait for the copier, compare hot pages, plan). For each pattern and pause mode it
prints the pause's steps:

  kick     the vCPU kick signal landing: request to KVM_RUN returning (the guest runs on
           meanwhile; counted in the pause all the same)
  get      KVM_GET_DIRTY_LOG (+ waiting for a late copier, never here)
  lists    merging the VMM's marks, the hot set, the page lists
  wp       UFFDIO_WRITEPROTECT of the copy-on-write runs (one call per run)
  clear    KVM_CLEAR_DIRTY_LOG of the pages copied in the pause
  vcpu     the vCPU state (regs/sregs/events from kvm_run, the rest by ioctl)
  gil      taking the GIL on the vCPU thread
  devices  the device state (Python)
  copy     what was left of the in-pause copy after vcpu + devices (the copier thread
           copies along from `clear` on)
  total    request to guest running again (= the benchmark's pause)

and then the kernel's price per page on this host: KVM's write-protect fault on a guest
write after a harvest, the userfaultfd copy-on-write fault, UFFDIO_WRITEPROTECT per call
and per page, KVM_CLEAR_DIRTY_LOG per page, and the copy of a cold page.

Run (root, /dev/kvm):  .venv/bin/python examples/profile_pause.py [--quick]
"""
import platform
import statistics
import sys
import time

from colocore.colo.checkpoint import checkpoint_pause
from colocore.migration.params import pause_mode_parameters
from colocore.tools.bench.pipeline import bench_faults
from colocore.vm.machine import Machine
from colocore_ext import capture, pages

STEPS = ("kick", "get", "lists", "wp", "clear", "vcpu", "gil", "devices", "copy", "total")


def _guest(append, mem=256 << 20):
    m = Machine(mem, "profile", on_event=lambda *a: None)
    m.boot("dirtier", append)
    m.console_out.attach(lambda fn, *a: None)
    m.serial_out.attach(lambda fn, *a: None)
    m.start_thread()
    m.resume()
    time.sleep(0.3)
    was = m.park_quietly()
    m.memory.harvest()                      # as COLO starts: after the migration's last one
    m.unpark_quietly(was)
    return m


def pause_steps(append, mode, rounds=40, gap_s=0.2):
    params = pause_mode_parameters(mode)
    m = _guest(append)
    cap = capture.Capture(m.memory.dirty, cow=params["x-colo-pause"] == "cow",
                          hot_max=params["x-colo-hot-pages"])
    cap.precopy_min = params["x-colo-precopy"]
    cap.reserve(m.memory.npages)
    steps = {k: [] for k in STEPS}
    kinds = {"dirty": [], "hot": [], "cow": [], "in pause": [], "pre-copied": []}
    copier = []
    try:
        for n in range(rounds + 3):
            deadline = time.perf_counter() + gap_s
            while cap.precopy_min and time.perf_counter() + 0.02 < deadline:
                time.sleep(0.02)
                cap.precopy()
            time.sleep(max(0.0, deadline - time.perf_counter()))
            cpu, pause_s, in_loop = checkpoint_pause(m, cap, m.device_states)
            cap.wait_copied()
            cap.compare_hot()
            cap.plan_send()
            if n < 3 or not in_loop:        # learning the hot set
                continue
            v = m.vcpu
            for name, value in (("kick", v.t_exit - v.t_request), ("get", cap.last_get_us),
                                ("lists", cap.last_classify_us), ("wp", cap.last_wp_us),
                                ("clear", cap.last_clear_us), ("vcpu", v.t_vcpu - v.t_ram),
                                ("gil", v.t_gil - v.t_vcpu), ("devices", v.t_dev - v.t_gil),
                                ("copy", v.t_resume - v.t_dev),
                                ("total", v.t_resume - v.t_request)):
                steps[name].append(value / 1000)
            for name, value in (("dirty", cap.last_dirty), ("hot", cap.last_hot),
                                ("cow", cap.last_cow), ("in pause", cap.last_in_pause),
                                ("pre-copied", cap.last_precopied)):
                kinds[name].append(value)
            if cap.last_cow:
                copier.append(cap.copier_us / 1000)
    finally:
        cap.close()
        m.close()
    print("%s, mode %s: %d pauses; pages per pause (median): %s" % (
        append, mode, len(steps["total"]),
        ", ".join("%s %d" % (k, statistics.median(v)) for k, v in kinds.items())))
    for name in STEPS:
        v = sorted(steps[name])
        print("  %-8s p50 %7.3f ms   p90 %7.3f ms   p99 %7.3f ms"
              % (name, v[len(v) // 2], v[int(len(v) * 0.9)], v[int(len(v) * 0.99)]))
    if copier:
        print("  copier (after the pause) p50 %.3f ms" % statistics.median(copier))


def old_pause(append, rounds=40, gap_s=0.2):
    """The pause as it was before the capture ran in the vCPU's loop, for comparison in
    the same run: park the vCPU (a signal, then a condition hand-off to this thread),
    harvest (GET + CLEAR), gather, the vCPU state by ioctl, the devices, unpark."""
    m = _guest(append)
    staging = bytearray(m.memory.npages * 4096)
    staging[::4096] = bytes(m.memory.npages)
    total, fixed = [], []
    try:
        for _ in range(rounds + 3):
            time.sleep(gap_s)
            t0 = time.perf_counter()
            was = m.park_quietly()
            t1 = time.perf_counter()
            pfns = m.memory.harvest()
            t2 = time.perf_counter()
            pages.gather(m.memory.ram, pfns, staging)
            t3 = time.perf_counter()
            m.vcpu.get_state()
            m.device_states()
            m.unpark_quietly(was)
            t4 = time.perf_counter()
            total.append((t4 - t0) * 1000)
            fixed.append(((t1 - t0) + (t4 - t3)) * 1000)
    finally:
        m.close()
    total, fixed = sorted(total[3:]), sorted(fixed[3:])
    print("%s, the old pause: total p50 %.3f ms p90 %.3f ms; park + vCPU + devices + unpark "
          "p50 %.3f ms" % (append, total[len(total) // 2], total[int(len(total) * 0.9)],
                          fixed[len(fixed) // 2]))


def wp_cost(rounds=8):
    """UFFDIO_WRITEPROTECT at the pause for scans of 64 / 1024 / 8192 pages per checkpoint
    (no hot set, no pre-copy, every run write-protected): a least-squares fit of its time
    to calls (runs) and pages. Then the same scans copied in the pause: the copy of a
    cold page and KVM_CLEAR_DIRTY_LOG per page."""
    samples = []
    for n in (64, 1024, 8192):
        m = _guest("pattern=scan wss=%d interval=50" % n)
        cap = capture.Capture(m.memory.dirty, cow=True, hot_max=0, min_run=1)
        cap.precopy_min = 1 << 40
        cap.reserve(m.memory.npages)
        clear, copy = [], []
        try:
            for cow in (True, False):
                cap.cow = cow
                for _ in range(rounds + 2):
                    time.sleep(0.06)
                    checkpoint_pause(m, cap, m.device_states)
                    cap.wait_copied()
                    cap.compare_hot()
                    cap.plan_send()
                    if cow and cap.last_runs:
                        samples.append((cap.last_runs, cap.last_cow, cap.last_wp_us))
                    elif not cow and cap.last_in_pause >= n:
                        clear.append(cap.last_clear_us / cap.last_in_pause)
                        copy.append((cap.last_end_us + cap.last_clear_us) / cap.last_in_pause)
        finally:
            cap.close()
            m.close()
        print("  scans of %5d pages copied in the pause: KVM_CLEAR_DIRTY_LOG and copy "
              "together %.3f us/page (of which the clear, with the copier thread copying "
              "along, %.3f)" % (n, statistics.median(copy), statistics.median(clear)))
    # least squares for wp = a * calls + b * pages
    s_cc = sum(c * c for c, p, t in samples)
    s_cp = sum(c * p for c, p, t in samples)
    s_pp = sum(p * p for c, p, t in samples)
    s_ct = sum(c * t for c, p, t in samples)
    s_pt = sum(p * t for c, p, t in samples)
    det = s_cc * s_pp - s_cp * s_cp
    a = (s_ct * s_pp - s_pt * s_cp) / det
    b = (s_pt * s_cc - s_ct * s_cp) / det
    print("  UFFDIO_WRITEPROTECT at the pause: %.1f us per call + %.3f us per page "
          "(%d pauses)" % (a, b, len(samples)))


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    rounds = 10 if quick else 40
    print("kernel %s" % platform.release())
    for append in ("pattern=hot wss=0", "pattern=hot wss=1000"):
        old_pause(append, rounds=rounds)
        pause_steps(append, "hot+pre+cow", rounds=rounds)
    for append, modes in (("pattern=hot wss=1000", ("copy",)),
                          ("pattern=hot wss=10000", ("copy", "hot+pre+cow")),
                          ("pattern=scan wss=10000 interval=200", ("copy", "cow", "hot+pre+cow"))):
        for mode in modes:
            pause_steps(append, mode, rounds=rounds)
    print("what the kernel charges per page, this host:")
    f = bench_faults()
    print("  a guest write after a harvest (KVM write-protect fault): %.2f us" % f["wp_fault_us"])
    if f.get("uffd_fault_us") is not None:
        print("  a guest write to a copy-on-write page (userfaultfd, Cython handler): %.2f us, "
              "of which the handler %.2f us (UFFDIO_WRITEPROTECT un-protect %.2f us)"
              % (f["uffd_fault_us"], f["uffd_handler_us"], f["uffd_unprotect_us"]))
    wp_cost(rounds=4 if quick else 8)
