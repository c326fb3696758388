"""`colocore bench pipeline`: what one checkpoint's memory work costs on this machine.

Measured in one run, so the ratios compare like with like:
  memcpy        the physical reference: one memcpy of a buffer as big as the gather batch
  gather        dirty pages (random pfns, ascending) copied out of guest RAM into staging,
                with zero-page detection
  delta         XBZRLE encode/decode of pages with 1-5% of their bytes changed
  lz4           batch compress/decompress of the staged pages, next to python-lz4 on
                one big buffer of the same data
  harvest       KVM dirty-log harvest (GET + CLEAR + bitmap -> pfn list) of a 256 MiB and a
                4 GiB memslot with 0/1/10/100% of pages written by a real guest
Page mix: zero pages, text-like pages (words), sparse binary pages (mostly zero with a
few non-zero 8-byte words: page tables, heaps) and random pages (compressed or encrypted
data). GB/s are page bytes processed per second (1 GB = 1e9 bytes); each figure is the
median of several runs after a warm-up.

Guest writes are the only writes KVM's dirty log sees, so the harvest benchmark runs a
tiny CPL-3 guest (`PageWritingGuest`) that stores one byte to each page of a list.
"""
import array
import os
import random
import statistics
import struct
import time

PAGE = 4096
MIB = 1 << 20


# ---- a guest that dirties chosen pages ------------------------------------------------

class PageWritingGuest:
    """A VM (colocore_ext.kvm) whose CPL-3 guest stores one byte into each page of a list.

    Slot 0 (8 MiB at GPA 0) holds page tables, GDT, code, and the page list; slot 1 is
    the measured slot (`slot_size` bytes at GPA 4 GiB, MAP_NORESERVE, dirty logging on).
    `write_pages(pfns)` puts the list in guest memory and runs the vCPU until the guest
    stores to the DONE doorbell (an unbacked address: an MMIO exit, where the bus kicks
    the vCPU out of its run loop). Use as a context manager: it closes the VM on exit.
    """
    LOW_SIZE = 8 * MIB
    SLOT_GPA = 4 << 30
    DONE = 12 << 30                  # unbacked: the store exits with KVM_EXIT_MMIO
    LIST, COUNT = 0x400000, 0x3FF000
    PML4, PDPT, PD = 0x1000, 0x2000, 0x3000
    GDT, KCODE, UCODE = 0x500, 0x20000, 0x21000   # the PDs end at 0x13000
    MEASURED_SLOT = 1

    def __init__(self, slot_size, manual_protect=True):
        from colocore_ext import kvm
        from colocore_ext.dirtylog import enable_manual_protect
        self.slot_size = slot_size
        self.vm = kvm.Vm(self.LOW_SIZE, dirty_log=False)
        try:
            # before the dirty-logged slot exists, as the kernel requires
            self.manual_protect = enable_manual_protect(self.vm.fd) if manual_protect else False
            self.low = self.vm.memory()
            self.mem, _ = self.vm.add_slot(self.MEASURED_SLOT, self.SLOT_GPA, slot_size,
                                           dirty_log=True)
            self._build()
            self.vcpu = kvm.Vcpu(self.vm)
            self.vcpu.set_long_mode(self.KCODE, 0x70000, 0, 0, self.PML4, self.GDT, 5 * 8 - 1)
        except BaseException:
            self.close()
            raise

    def _poke(self, gpa, data):
        self.low[gpa:gpa + len(data)] = data

    def _build(self):
        # identity map of 0..16 GiB, 2 MiB pages, user accessible
        self._poke(self.PML4, struct.pack("<Q", self.PDPT | 7))
        self._poke(self.PDPT, struct.pack("<16Q", *[(self.PD + j * 0x1000) | 7 for j in range(16)]))
        for j in range(16):
            self._poke(self.PD + j * 0x1000,
                       struct.pack("<512Q", *[((j * 512 + i) << 21) | 0x87 for i in range(512)]))
        # kernel code 0x08 and data 0x10 (what set_long_mode loads), user data 0x18, code 0x20
        gdt = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CFF3000000FFFF,
               0x00AFFB000000FFFF]
        self._poke(self.GDT, struct.pack("<5Q", *gdt))
        # CPL 0: iretq to the user code (ss=0x1b, rsp, rflags, cs=0x23, rip)
        self._poke(self.KCODE, b"\x6A\x1B" + b"\x68" + struct.pack("<I", 0x80000)
                   + b"\x68" + struct.pack("<I", 2) + b"\x6A\x23"
                   + b"\x68" + struct.pack("<I", self.UCODE) + b"\x48\xCF")
        # CPL 3:      mov rbx, SLOT_GPA
        # start:      mov rsi, LIST ; mov ecx, [COUNT]
        # loop:       test ecx, ecx ; jz done
        #             mov eax, [rsi] ; shl rax, 12 ; mov [rbx+rax], dl ; add rsi, 4
        #             dec ecx ; jmp loop
        # done:       movabs [DONE], al ; jmp start
        code = (b"\x48\xBB" + struct.pack("<Q", self.SLOT_GPA)
                + b"\x48\xBE" + struct.pack("<Q", self.LIST)
                + b"\x8B\x0C\x25" + struct.pack("<I", self.COUNT)
                + b"\x85\xC9" + b"\x74\x11"
                + b"\x8B\x06" + b"\x48\xC1\xE0\x0C" + b"\x88\x14\x03" + b"\x48\x83\xC6\x04"
                + b"\xFF\xC9" + b"\xEB\xEB"
                + b"\xA2" + struct.pack("<Q", self.DONE)
                + b"\xEB\xCF")
        self._poke(self.UCODE, code)

    def dirty_log(self):
        from colocore_ext.dirtylog import DirtyLog
        return DirtyLog(self.vm.fd, self.MEASURED_SLOT, self.mem, self.slot_size,
                        manual_protect=self.manual_protect, gpa_base=self.SLOT_GPA)

    def write_pages(self, pfns):
        """Run the guest once: it writes one byte to each slot-relative page in `pfns`."""
        pfns = array.array("I", pfns)
        if len(pfns) * 4 > self.LOW_SIZE - self.LIST:
            raise ValueError("page list too long for the guest")
        self._poke(self.LIST, pfns.tobytes())
        self._poke(self.COUNT, struct.pack("<I", len(pfns)))
        why = self.vcpu.run_loop(self)
        if why != "kicked":
            raise RuntimeError("page-writing guest stopped: %s" % why)

    # the bus of run_loop: the only device is the DONE doorbell
    def mmio_write(self, addr, size, value):
        if addr != self.DONE:
            raise RuntimeError("page-writing guest wrote MMIO 0x%x" % addr)
        self.vcpu.kick()                 # run_loop returns "kicked" at once

    def mmio_read(self, addr, size):
        raise RuntimeError("page-writing guest read MMIO 0x%x" % addr)

    def pio_read(self, port, size):
        raise RuntimeError("page-writing guest read port 0x%x" % port)

    pio_write = pio_read

    def close(self):
        if getattr(self, "vcpu", None) is not None:
            self.vcpu.close()
            self.vcpu = None
        self.low = None
        self.vm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- page mixes -------------------------------------------------------------------------

_WORDS = ("the of and to in is that for it as was with be by on not he this are or his "
          "from at which but have an they you were her she there been one all we their "
          "checkpoint primary secondary memory page dirty guest kernel buffer socket "
          "failover replica network packet device console virtqueue interrupt timer "
          "request response error warning info debug value key index count size offset "
          "0 1 2 3 10 42 100 255 1024 4096 65536 /usr/lib /var/log /etc/hosts GET POST "
          "HTTP/1.1 200 404 json true false null {\"id\": [\"name\", ").split()
_INC = bytes((i + 1) & 0xFF for i in range(256))      # every byte changes under this map


def make_page_mix(npages, rnd):
    """Guest-RAM-like pages: 25% zero, 35% text, 25% sparse binary, 15% random."""
    kinds = ["zero"] * 25 + ["text"] * 35 + ["sparse"] * 25 + ["random"] * 15
    ram = bytearray(npages * PAGE)
    text = " ".join(rnd.choices(_WORDS, k=int(npages * 0.35 * PAGE / 5) + 2048)).encode()
    tpos = 0
    for p in range(npages):
        kind = kinds[rnd.randrange(100)]
        off = p * PAGE
        if kind == "text":
            if tpos + PAGE > len(text):
                tpos = 0
            ram[off:off + PAGE] = text[tpos:tpos + PAGE]
            tpos += PAGE
        elif kind == "sparse":
            for _ in range(rnd.randrange(16, 96)):
                w = rnd.randrange(512) * 8
                ram[off + w:off + w + 8] = rnd.getrandbits(40).to_bytes(8, "little")
        elif kind == "random":
            ram[off:off + PAGE] = os.urandom(PAGE)
    return ram


def change_pages(old, rnd, lo=0.01, hi=0.05):
    """A copy of `old` with lo..hi of each page's bytes changed, in runs of 1-64 bytes."""
    new = bytearray(old)
    for off in range(0, len(old), PAGE):
        budget = int(PAGE * rnd.uniform(lo, hi))
        while budget > 0:
            n = min(budget, rnd.choice((1, 2, 4, 8, 8, 8, 8, 16, 16, 32, 64)))
            o = off + rnd.randrange(PAGE - n)
            new[o:o + n] = bytes(new[o:o + n]).translate(_INC)
            budget -= n
    return new


# ---- measuring ----------------------------------------------------------------------------

def _median_time(fn, reps):
    fn()                                    # warm-up (page faults, caches)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _gbps(nbytes, seconds):
    return nbytes / seconds / 1e9


def bench_codecs(reps=15, ram_mib=64, batch_pages=4096, delta_pages=2048, seed=1):
    import lz4.block
    from colocore_ext import lz4batch, pages, xbzrle
    rnd = random.Random(seed)
    res = {}
    ram = make_page_mix(ram_mib * MIB // PAGE, rnd)
    nbytes = batch_pages * PAGE
    src = bytearray(os.urandom(nbytes))
    dst = bytearray(nbytes)
    res["memcpy_gbps"] = _gbps(nbytes, _median_time(lambda: pages.copy(dst, src), reps))

    pfns = array.array("I", sorted(rnd.sample(range(len(ram) // PAGE), batch_pages)))
    staging = bytearray(nbytes)
    res["gather_gbps"] = _gbps(nbytes, _median_time(lambda: pages.gather(ram, pfns, staging), reps))
    n_nonzero, zero_flags = pages.gather(ram, pfns, staging)
    res["gather_zero_pages"] = batch_pages - n_nonzero
    scatter_dest = bytearray(len(ram))
    res["scatter_gbps"] = _gbps(nbytes, _median_time(
        lambda: pages.scatter(scatter_dest, pfns, staging), reps))
    res["page_hash_gbps"] = _gbps(nbytes, _median_time(lambda: pages.page_hashes(ram, pfns), reps))

    # deltas: non-zero pages of the mix, 1-5% of their bytes changed
    nz = [p for p in range(len(ram) // PAGE) if not pages.is_zero_page(ram[p * PAGE:(p + 1) * PAGE])]
    chosen = rnd.sample(nz, delta_pages)
    old = bytearray(b"".join(ram[p * PAGE:(p + 1) * PAGE] for p in chosen))
    new = change_pages(old, rnd)
    dbytes = len(new)
    out = bytearray(dbytes)
    lengths = array.array("i", bytes(4 * delta_pages))
    res["delta_encode_gbps"] = _gbps(dbytes, _median_time(
        lambda: xbzrle.encode_batch(new, old, out, lengths), reps))
    used = xbzrle.encode_batch(new, old, out, lengths)
    res["delta_ratio"] = used / dbytes
    res["delta_overflow_pages"] = sum(1 for n in lengths if n < 0)
    deltas = bytes(out[:used])
    target = bytearray(old)
    res["delta_decode_gbps"] = _gbps(dbytes, _median_time(
        lambda: xbzrle.decode_batch(deltas, lengths, target), reps))
    if target != new:
        raise AssertionError("xbzrle round trip failed in the benchmark")
    res["delta_encode_identical_gbps"] = _gbps(dbytes, _median_time(
        lambda: xbzrle.encode_batch(old, old, out, lengths), reps))
    rnd_old, rnd_new = os.urandom(dbytes), os.urandom(dbytes)
    res["delta_encode_random_gbps"] = _gbps(dbytes, _median_time(
        lambda: xbzrle.encode_batch(rnd_new, rnd_old, out, lengths), reps))

    # lz4 on the staged batch (the gathered pages, zero pages included as sent raw data)
    batch = bytes(staging)
    res["lz4_gbps"] = _gbps(nbytes, _median_time(lambda: lz4batch.compress(batch), reps))
    res["lz4_reference_gbps"] = _gbps(nbytes, _median_time(
        lambda: lz4.block.compress(batch, store_size=False), reps))
    blob = lz4batch.compress(batch)
    ref_blob = lz4.block.compress(batch, store_size=False)
    res["lz4_ratio"] = len(blob) / nbytes
    res["lz4_decompress_gbps"] = _gbps(nbytes, _median_time(
        lambda: lz4batch.decompress(blob, nbytes), reps))
    res["lz4_reference_decompress_gbps"] = _gbps(nbytes, _median_time(
        lambda: lz4.block.decompress(ref_blob, uncompressed_size=nbytes), reps))
    res["lz4_library"] = lz4batch.LIBRARY
    return res


HARVEST_SLOTS = (("256mib", 256 * MIB), ("4gib", 4096 * MIB))
HARVEST_FRACTIONS = (("0pct", 0.0), ("1pct", 0.01), ("10pct", 0.10), ("100pct", 1.0))


def bench_harvest(rounds=9, seed=2):
    """Median harvest time in microseconds per slot size and dirty fraction."""
    rnd = random.Random(seed)
    res = {}
    for slot_name, size in HARVEST_SLOTS:
        npages = size // PAGE
        with PageWritingGuest(size) as guest:
            res["harvest_manual_protect"] = guest.manual_protect
            log = guest.dirty_log()
            log.harvest()                   # INITIALLY_SET: the first harvest is everything
            for frac_name, frac in HARVEST_FRACTIONS:
                n = int(npages * frac)
                runs = rounds if n < 100000 else 3
                times, clears = [], []
                for _ in range(runs):
                    dirty = range(npages) if n == npages else sorted(rnd.sample(range(npages), n))
                    guest.write_pages(dirty)
                    t = time.perf_counter_ns()
                    got = log.harvest()
                    times.append((time.perf_counter_ns() - t) / 1e3)
                    clears.append(log.last_clear_us)
                    if len(got) != n:
                        raise AssertionError("harvest found %d pages, the guest wrote %d"
                                             % (len(got), n))
                key = "harvest_us_%s_%s" % (slot_name, frac_name)
                res[key] = statistics.median(times)
                res[key.replace("harvest_us", "harvest_clear_us")] = statistics.median(clears)
    return res


def _pass_us(guest, pfns):
    t = time.perf_counter()
    guest.write_pages(pfns)
    return (time.perf_counter() - t) * 1e6


def bench_faults(npages=2000, rounds=5, seed=3):
    """What a guest write costs the guest under protection, per page, on this host:
    wp_fault_us    the first CPL-3 write to a page after a dirty-log harvest re-protected
                   it (KVM's write-protect fault), minus the same write when writable;
    uffd_fault_us  a write to a page write-protected with userfaultfd for copy-on-write,
                   handled by the capture's fault-handler thread (copy the page, clear its
                   dirty bit, un-protect), minus the write when writable. It includes
                   the KVM fault that follows (the handler re-arms dirty logging first).
    Medians of `rounds` passes over `npages` pages spread over a 256 MiB slot."""
    from colocore_ext import capture
    rnd = random.Random(seed)
    res = {}
    with PageWritingGuest(256 * MIB) as guest:
        log = guest.dirty_log()
        pfns = sorted(rnd.sample(range(256 * MIB // PAGE), npages))
        guest.write_pages(pfns)               # populate
        log.harvest()                         # INITIALLY_SET: the first harvest is all
        wp, uffd = [], []
        for _ in range(rounds):
            guest.write_pages(pfns)           # dirty (and writable again)
            warm = _pass_us(guest, pfns)
            log.harvest()                     # re-protect exactly these pages
            wp.append((_pass_us(guest, pfns) - warm) / npages)
        cap = capture.Capture(log, cow=True, hot_max=0, min_run=1)
        try:
            if not cap.cow_ready:
                res["uffd_fault_us"] = None
                res["uffd_unavailable"] = cap.cow_reason
            else:
                cap.precopy_min = 1 << 40     # no pre-copy here
                for _ in range(rounds):
                    guest.write_pages(pfns)
                    warm = _pass_us(guest, pfns)
                    cap.hold_copier(True)     # every write finds its page not yet copied
                    cap.pause()               # the guest is stopped between write_pages
                    cap.start_copier()
                    t = _pass_us(guest, pfns)
                    cap.hold_copier(False)
                    cap.wait_copied()
                    cap.compare_hot()
                    cap.plan_send()
                    uffd.append((t - warm) / npages)
                res["uffd_fault_us"] = statistics.median(uffd)
                res["uffd_faults_seen"] = cap.faults
                # UFFDIO_WRITEPROTECT on present guest pages: per call and per page
                run = list(range(0, 8192))
                guest.write_pages(run)
                for n in (1, 8192):
                    t = [cap.time_write_protect(0, n) for _ in range(rounds)]
                    res["uffd_protect_us_%d" % n] = statistics.median(a for a, b in t)
                    res["uffd_unprotect_us_%d" % n] = statistics.median(b for a, b in t)
                per_page = (res["uffd_protect_us_8192"] - res["uffd_protect_us_1"]) / 8191
                res["uffd_wp_call_us"] = res["uffd_protect_us_1"] - per_page
                res["uffd_wp_page_us"] = per_page
                res["uffd_handler_us"] = cap.handler_us / max(cap.faults, 1)
                res["uffd_unprotect_us"] = cap.unprotect_us / max(cap.fault_copies, 1)
        finally:
            cap.close()
        res["wp_fault_us"] = statistics.median(wp)
    return res


def kvm_available():
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def run(args):
    """Every stage; returns the figures."""
    harvest = not getattr(args, "no_harvest", False)
    res = bench_codecs()
    if harvest and kvm_available():
        res.update(bench_harvest())
        res.update(bench_faults())
    else:
        res["harvest_us_256mib_1pct"] = None
        res["wp_fault_us"] = res["uffd_fault_us"] = None
        res["harvest_skipped"] = "no usable /dev/kvm" if harvest else "--no-harvest"
    m = res["memcpy_gbps"]
    res["ratios"] = {
        "gather_vs_memcpy": res["gather_gbps"] / m,
        "delta_encode_vs_memcpy": res["delta_encode_gbps"] / m,
        "delta_decode_vs_memcpy": res["delta_decode_gbps"] / m,
        "lz4_vs_reference": res["lz4_gbps"] / res["lz4_reference_gbps"],
    }
    return res


TARGETS = (("gather_vs_memcpy", ">=", 0.7), ("delta_encode_vs_memcpy", ">=", 0.5),
           ("delta_decode_vs_memcpy", ">=", 0.7), ("lz4_vs_reference", ">=", 0.9))


def format(res):
    lines = ["colocore pipeline benchmark (GB/s = 1e9 page bytes per second, medians)", ""]
    rows = [("memcpy (physical reference)", "memcpy_gbps"),
            ("gather (with zero detection)", "gather_gbps"),
            ("scatter", "scatter_gbps"),
            ("page hashes", "page_hash_gbps"),
            ("delta encode, 1-5% changed", "delta_encode_gbps"),
            ("delta encode, identical", "delta_encode_identical_gbps"),
            ("delta encode, random (overflow)", "delta_encode_random_gbps"),
            ("delta decode, 1-5% changed", "delta_decode_gbps"),
            ("lz4 batch compress", "lz4_gbps"),
            ("python-lz4 compress, same buffer", "lz4_reference_gbps"),
            ("lz4 batch decompress", "lz4_decompress_gbps"),
            ("python-lz4 decompress, same buffer", "lz4_reference_decompress_gbps")]
    for label, key in rows:
        lines.append("  %-36s %8.2f GB/s" % (label, res[key]))
    lines.append("  %-36s %8.3f (overflow pages: %d)" % ("delta size / page size", res["delta_ratio"],
                                                          res["delta_overflow_pages"]))
    lines.append("  %-36s %8.3f" % ("lz4 size / batch size", res["lz4_ratio"]))
    lines.append("")
    if res.get("harvest_us_256mib_1pct") is None:
        lines.append("  dirty-log harvest: skipped (%s)" % res.get("harvest_skipped"))
    else:
        lines.append("  dirty-log harvest, us (of which KVM_CLEAR_DIRTY_LOG); manual protect: %s"
                     % res["harvest_manual_protect"])
        lines.append("  %-10s" % "slot" + "".join("%18s" % f for f, _ in HARVEST_FRACTIONS))
        for slot_name, _ in HARVEST_SLOTS:
            cells = ""
            for frac_name, _ in HARVEST_FRACTIONS:
                k = "%s_%s" % (slot_name, frac_name)
                cells += "%18s" % ("%.0f (%.0f)" % (res["harvest_us_" + k], res["harvest_clear_us_" + k]))
            lines.append("  %-10s" % slot_name + cells)
    if res.get("wp_fault_us") is not None:
        lines.append("")
        lines.append("  guest write to a protected page, us per page (minus a plain write):")
        lines.append("  %-36s %8.2f" % ("KVM write-protect fault (wp_fault_us)", res["wp_fault_us"]))
        if res.get("uffd_fault_us") is not None:
            lines.append("  %-36s %8.2f" % ("userfaultfd copy-on-write (uffd_fault_us)",
                                             res["uffd_fault_us"]))
            lines.append("  %-36s %8.2f us per call + %.3f us per page" % (
                "UFFDIO_WRITEPROTECT (protect)", res["uffd_wp_call_us"], res["uffd_wp_page_us"]))
        else:
            lines.append("  userfaultfd copy-on-write: unavailable (%s)" % res.get("uffd_unavailable"))
    lines.append("")
    lines.append("  targets (ratios measured in this run):")
    for key, op, want in TARGETS:
        got = res["ratios"][key]
        lines.append("  %-28s %6.2f  (target %s %.1f) %s" % (key, got, op, want,
                                                             "ok" if got >= want else "SHORT"))
    h = res.get("harvest_us_256mib_1pct")
    if h is not None:
        lines.append("  %-28s %6.0f  (target <= 100 us) %s" % ("harvest 256 MiB, 1% dirty", h,
                                                             "ok" if h <= 100 else "SHORT"))
    return "\n".join(lines)
