#!/usr/bin/env python3
"""Build the colocore guest images (kvstore.elf, dirtier.elf, kvnet.elf) with gcc + GNU ld.

Each image is a Multiboot v1 ELF32 file: the code is compiled and linked as x86-64
(everything sits below 4 GiB), then converted with `objcopy -O elf32-i386`, which keeps
the program headers (one PT_LOAD at 1 MiB, one PT_NOTE with the "colocore" 64-bit entry
note). See docs/DESIGN.md and guests/README.md.

    python3 guests/build_guests.py OUT_DIR
"""
import os
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
GUESTS = {"kvstore": ["kvstore.c", "kvtable.c"], "dirtier": ["dirtier.c"],
          "kvnet": ["kvnet.c", "netdrv.c", "netstack.c", "resp.c", "kvtable.c"]}
COMMON = ["boot.S", "kern.c", "lib.c"]
CFLAGS = ["-m64", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-ffreestanding", "-fno-builtin", "-nostdlib", "-fno-pic", "-fno-pie",
          "-mcmodel=small", "-mno-red-zone", "-mgeneral-regs-only", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-fcf-protection=none",
          "-fno-tree-loop-distribute-patterns"]
LDFLAGS = ["-m", "elf_x86_64", "-nostdlib", "-static", "-z", "max-page-size=0x1000",
           "-z", "noexecstack", "--no-warn-rwx-segments", "--build-id=none"]


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError("guest build step failed: %s\n%s" % (" ".join(cmd), proc.stdout))
    return proc.stdout


def _tool(name):
    path = shutil.which(name)
    if path is None:
        raise RuntimeError("guest build needs %r on PATH (gcc and GNU binutils)" % name)
    return path


def check_image(path):
    """Sanity-check a built image: ELF32 i386, Multiboot header, colocore note."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 1 or struct.unpack_from("<H", data, 18)[0] != 3:
        raise RuntimeError("%s is not an ELF32 i386 file" % path)
    for off in range(0, min(len(data), 8192) - 11, 4):
        magic, flags, csum = struct.unpack_from("<III", data, off)
        if magic == 0x1BADB002:
            if (magic + flags + csum) & 0xFFFFFFFF or not flags & 2:
                raise RuntimeError("%s: bad Multiboot header" % path)
            break
    else:
        raise RuntimeError("%s: no Multiboot header in the first 8 KiB" % path)
    phoff, = struct.unpack_from("<I", data, 28)
    phentsize, phnum = struct.unpack_from("<HH", data, 42)
    for i in range(phnum):
        p_type, p_offset, _v, _p, p_filesz = struct.unpack_from("<IIIII", data, phoff + i * phentsize)
        if p_type == 4:
            note = data[p_offset:p_offset + p_filesz]
            namesz, descsz, ntype = struct.unpack_from("<III", note, 0)
            if note[12:12 + namesz] == b"colocore\0" and ntype == 1 and descsz == 4:
                return struct.unpack_from("<I", note, 24)[0]
    raise RuntimeError("%s: no PT_NOTE with the colocore 64-bit entry" % path)


def build(out_dir):
    """Compile every guest image into out_dir; RuntimeError on failure."""
    gcc, ld, objcopy = _tool("gcc"), _tool("ld"), _tool("objcopy")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="colocore-guests-") as tmp:
        objs = {}
        for src in COMMON + sorted({s for srcs in GUESTS.values() for s in srcs}):
            obj = os.path.join(tmp, os.path.splitext(src)[0] + ".o")
            _run([gcc] + CFLAGS + ["-c", os.path.join(HERE, src), "-o", obj], tmp)
            objs[src] = obj
        for name, srcs in GUESTS.items():
            elf64 = os.path.join(tmp, name + ".elf64")
            elf32 = os.path.join(tmp, name + ".elf")
            _run([ld] + LDFLAGS + ["-T", os.path.join(HERE, "guest.ld"), "-o", elf64]
                 + [objs[s] for s in COMMON + srcs], tmp)
            _run([objcopy, "-O", "elf32-i386", elf64, elf32], tmp)
            check_image(elf32)
            dest = os.path.join(out_dir, name + ".elf")
            shutil.copyfile(elf32, dest + ".tmp")
            os.replace(dest + ".tmp", dest)
    return [os.path.join(out_dir, n + ".elf") for n in GUESTS]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: %s OUT_DIR" % sys.argv[0])
    try:
        for p in build(sys.argv[1]):
            print(p)
    except RuntimeError as exc:
        sys.exit(str(exc))
