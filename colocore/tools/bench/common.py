"""What every benchmark shares: progress on stderr, the machine it ran on, the memcpy
reference."""
import ctypes
import os
import platform
import re
import statistics
import sys
import time

PAGE = 4096


def say(fmt, *args):
    """Progress on the terminal (stderr)."""
    sys.stderr.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), fmt % args if args else fmt))
    sys.stderr.flush()


_libc = ctypes.CDLL(None)
_libc.memcpy.restype = ctypes.c_void_p
_libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def memcpy_ms(npages, repeats=31):
    """Median time of one memcpy of `npages` pages (warm buffers, fresh each size)."""
    if npages == 0:
        return 0.0
    size = npages * PAGE
    src = (ctypes.c_char * size).from_buffer(bytearray(os.urandom(PAGE) * npages))
    dst = (ctypes.c_char * size).from_buffer(bytearray(size))
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        _libc.memcpy(dst, src, size)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1000


def machine_description():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    kvm = "kvm_pvm" if os.path.exists("/sys/module/kvm_pvm") else \
        "kvm_intel" if os.path.exists("/sys/module/kvm_intel") else \
        "kvm_amd" if os.path.exists("/sys/module/kvm_amd") else "kvm"
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(f.readline().split()[1]) / (1 << 20)
    except (OSError, ValueError, IndexError):
        mem_gib = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem_gib, 1),
            "kernel": platform.release(), "kvm": kvm, "python": platform.python_version()}




def host_line(host):
    return "host: kernel %(kernel)s, %(kvm)s, %(cpu)s, %(cores)d cores, %(mem_gib).0f GiB, " \
           "Python %(python)s" % host
