"""Multiboot v1 ELF32 loader (see docs/DESIGN.md, "Guest boot protocol").

Loads PT_LOAD segments at their physical addresses, writes the multiboot info and the
command line, and picks the entry: the colocore 64-bit entry from the "colocore" ELF
note when the image has one (with loader-built identity page tables and GDT), else the
standard 32-bit protected-mode entry.
"""
import os
import struct
from dataclasses import dataclass

from colocore.errors import GuestImageError

MB_MAGIC = 0x1BADB002
MB_BOOT_MAGIC = 0x2BADB002
INFO_ADDR = 0x9000
CMDLINE_ADDR = 0x9400
CMDLINE_MAX = 0x0C00
PML4, PDPT, PD = 0x1000, 0x2000, 0x3000
GDT_ADDR = 0x7000
LOADER_STACK = 0x8FF0
LOADER_END = 0x10000
NOTE_NAME = b"colocore\0"
NOTE_ENTRY64 = 1

BUILTIN = ("kvstore", "dirtier", "kvnet")


def builtin_path(name):
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "guests", name + ".elf")


def resolve_kernel(name_or_path):
    """A built-in guest name or a path; one clear error when neither."""
    if name_or_path in BUILTIN:
        path = builtin_path(name_or_path)
        if not os.path.exists(path):
            raise GuestImageError("built-in guest %r is missing at %s: the install did not "
                                  "build the guest images; reinstall (pip install .)" % (name_or_path, path))
        return path
    if os.sep in name_or_path or os.path.exists(name_or_path):
        if not os.path.exists(name_or_path):
            raise GuestImageError("kernel %s: no such file" % name_or_path)
        return name_or_path
    raise GuestImageError("unknown kernel %r: use one of %s or a path to a Multiboot ELF32 "
                          "image" % (name_or_path, ", ".join(BUILTIN)))


@dataclass
class Image:
    path: str
    segments: list          # (paddr, file bytes, memsz)
    entry32: int
    entry64: int | None
    end: int                # highest physical address used


def parse(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise GuestImageError("kernel %s: %s" % (path, exc.strerror)) from None
    if len(data) < 52 or data[:4] != b"\x7fELF":
        raise GuestImageError("kernel %s is not an ELF file; colocore boots Multiboot v1 "
                              "ELF32 images" % path)
    if data[4] != 1:
        raise GuestImageError("kernel %s is ELF64; colocore boots Multiboot v1 ELF32 images "
                              "(link with -m elf_i386 or objcopy -O elf32-i386)" % path)
    if data[5] != 1:
        raise GuestImageError("kernel %s is big-endian ELF; expected x86 ELF32" % path)
    head = data[:8192]
    for off in range(0, len(head) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", head, off)
        if magic == MB_MAGIC:
            if (magic + flags + checksum) & 0xFFFFFFFF:
                raise GuestImageError("kernel %s: multiboot header checksum is wrong" % path)
            if flags & 0xFFFC0000 & ~0x00010000:
                pass
            break
    else:
        raise GuestImageError("kernel %s has no Multiboot v1 header (0x1BADB002) in its "
                              "first 8 KiB" % path)
    (e_type, e_machine, _v, e_entry, e_phoff, _sh, _fl, _eh, e_phentsize, e_phnum) = \
        struct.unpack_from("<HHIIIIIHHH", data, 16)
    if e_machine != 3:
        raise GuestImageError("kernel %s: ELF machine %d, expected i386 (3)" % (path, e_machine))
    if e_phentsize < 32 or e_phoff + e_phnum * e_phentsize > len(data):
        raise GuestImageError("kernel %s: program headers are truncated" % path)
    segments, entry64, end = [], None, 0
    for i in range(e_phnum):
        p_type, p_offset, _va, p_paddr, p_filesz, p_memsz, _f, _al = \
            struct.unpack_from("<IIIIIIII", data, e_phoff + i * e_phentsize)
        if p_offset + p_filesz > len(data):
            raise GuestImageError("kernel %s: segment %d runs past the end of the file" % (path, i))
        if p_type == 1 and p_memsz:
            if p_paddr < LOADER_END:
                raise GuestImageError("kernel %s: segment at 0x%x overlaps the loader area "
                                      "below 0x%x" % (path, p_paddr, LOADER_END))
            segments.append((p_paddr, data[p_offset:p_offset + p_filesz], p_memsz))
            end = max(end, p_paddr + p_memsz)
        elif p_type == 4:
            entry64 = _find_note(data[p_offset:p_offset + p_filesz]) or entry64
    if not segments:
        raise GuestImageError("kernel %s has no loadable segments" % path)
    return Image(path, segments, e_entry, entry64, end)


def _find_note(notes):
    off = 0
    while off + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, off)
        name = notes[off + 12:off + 12 + namesz]
        desc_off = off + 12 + ((namesz + 3) & ~3)
        if name == NOTE_NAME and ntype == NOTE_ENTRY64 and descsz >= 4:
            return struct.unpack_from("<I", notes, desc_off)[0]
        off = desc_off + ((descsz + 3) & ~3)
    return None


def load(image, ram, mem_size, cmdline, vcpu):
    """Place the image and boot data into guest RAM and set the vCPU at the entry."""
    if image.end > mem_size:
        raise GuestImageError("kernel %s needs %d MiB of memory, the machine has %d MiB; "
                              "raise -m" % (image.path, (image.end + (1 << 20) - 1) >> 20,
                                            mem_size >> 20))
    for paddr, filebytes, memsz in image.segments:
        ram[paddr:paddr + len(filebytes)] = filebytes
        ram[paddr + len(filebytes):paddr + memsz] = bytes(memsz - len(filebytes))
    cmd = (os.path.basename(image.path) + (" " + cmdline if cmdline else "")).encode()
    if len(cmd) >= CMDLINE_MAX:
        raise GuestImageError("--append is too long (%d bytes, limit %d)" % (len(cmd), CMDLINE_MAX - 1))
    ram[CMDLINE_ADDR:CMDLINE_ADDR + len(cmd) + 1] = cmd + b"\0"
    mem_lower = 640
    mem_upper = (min(mem_size, 0xC0000000) >> 10) - 1024
    info = bytearray(88)
    struct.pack_into("<III", info, 0, 0x1 | 0x4, mem_lower, mem_upper)
    struct.pack_into("<I", info, 16, CMDLINE_ADDR)
    ram[INFO_ADDR:INFO_ADDR + len(info)] = info
    if image.entry64 is not None:
        _identity_map(ram)
        gdt = struct.pack("<QQQ", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
        ram[GDT_ADDR:GDT_ADDR + len(gdt)] = gdt
        vcpu.set_long_mode(image.entry64, LOADER_STACK, MB_BOOT_MAGIC, INFO_ADDR,
                           PML4, GDT_ADDR, len(gdt) - 1)
        return "64-bit"
    vcpu.set_protected_mode(image.entry32, MB_BOOT_MAGIC, INFO_ADDR)
    return "32-bit"


# Entry bits: present|writable|user, plus Accessed (and Dirty on the 2 MiB leaves) set up
# front. Why: the MMU sets A/D bits by writing the page tables, and under kvm_pvm those
# writes are not in KVM's dirty log (found by --colo-verify: the secondary's copies of
# the page-table pages went stale). With the bits already set nothing ever writes them.
UPPER = 0x7 | 0x20
LEAF_2M = 0x7 | 0x20 | 0x40 | 0x80


def _identity_map(ram):
    """Identity-map 4 GiB with 2 MiB pages, present|writable|user (docs/DESIGN.md)."""
    struct.pack_into("<Q", ram, PML4, PDPT | UPPER)
    for j in range(4):
        struct.pack_into("<Q", ram, PDPT + 8 * j, (PD + 0x1000 * j) | UPPER)
        struct.pack_into("<512Q", ram, PD + 0x1000 * j,
                         *[((j * 512 + i) << 21) | LEAF_2M for i in range(512)])
