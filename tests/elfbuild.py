"""Build tiny Multiboot v1 ELF32 images in Python, for tests of the loader and of guests
that misbehave (triple fault, halt for good). Not a product feature."""
import struct

LOAD_ADDR = 0x100000


def multiboot_elf(code64, extra_bytes=0, paddr=LOAD_ADDR, with_note=True, bad_checksum=False):
    """An ELF32 with a multiboot header, a PT_LOAD at `paddr` and the colocore 64-bit note.

    `code64` is x86-64 machine code placed right after the multiboot header; the note's
    64-bit entry points at it.
    """
    ehdr_size, phdr_size = 52, 32
    nph = 2 if with_note else 1
    note_name = b"colocore\0"
    note = struct.pack("<III", len(note_name), 4, 1) + note_name + b"\0" * ((-len(note_name)) % 4)
    text_off = ehdr_size + nph * phdr_size
    text_off += (-text_off) % 16
    mb_flags = 0x3
    checksum = (-(0x1BADB002 + mb_flags)) & 0xFFFFFFFF
    if bad_checksum:
        checksum ^= 1
    mb = struct.pack("<III", 0x1BADB002, mb_flags, checksum) + b"\0" * 4
    entry64 = paddr + len(mb)
    body = mb + code64
    note += struct.pack("<I", entry64)
    note_off = text_off + len(body)
    phdrs = struct.pack("<IIIIIIII", 1, text_off, paddr, paddr, len(body), len(body) + extra_bytes, 7, 16)
    if with_note:
        phdrs += struct.pack("<IIIIIIII", 4, note_off, 0, 0, len(note), len(note), 4, 4)
    ehdr = (b"\x7fELF" + bytes([1, 1, 1, 0]) + b"\0" * 8
            + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, entry64, ehdr_size, 0, 0, ehdr_size,
                          phdr_size, nph, 40, 0, 0))
    image = ehdr + phdrs
    image += b"\0" * (text_off - len(image))
    return image + body + note


TRIPLE_FAULT = b"\x0f\x0b"          # ud2 with no IDT: #UD -> #DF -> triple fault
HALT = b"\xfa\xf4\xeb\xfc"           # cli; hlt; jmp back
