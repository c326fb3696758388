"""Bad input to `colocore run`: one line saying what to do, a non-zero exit, no hang."""
import os
import socket
import subprocess
import sys

import pytest

from elfbuild import HALT, TRIPLE_FAULT, multiboot_elf


def _run(*args, env=None, timeout=30):
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "colocore", "run", *args], capture_output=True,
                       text=True, timeout=timeout, env=e, stdin=subprocess.DEVNULL)
    return p.returncode, p.stderr


def _one_error_line(err):
    lines = [l for l in err.splitlines() if l.startswith("colocore: ")]
    assert lines, err
    assert "Traceback" not in err, err
    return lines[-1]


def test_unknown_kernel():
    rc, err = _run("--kernel", "nosuchguest")
    assert rc == 1
    assert "unknown kernel 'nosuchguest': use one of kvstore, dirtier" in _one_error_line(err)


def test_not_an_elf(tmp_path):
    p = tmp_path / "junk.bin"
    p.write_bytes(b"hello world" * 100)
    rc, err = _run("--kernel", str(p))
    assert rc == 1 and "is not an ELF file" in _one_error_line(err)


def test_elf64_is_refused(tmp_path):
    p = tmp_path / "x.elf"
    p.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(100))
    rc, err = _run("--kernel", str(p))
    assert rc == 1 and "is ELF64" in _one_error_line(err)


def test_no_multiboot_header(tmp_path):
    img = bytearray(multiboot_elf(HALT))
    i = img.find(b"\x02\xb0\xad\x1b")
    img[i:i + 4] = b"\0\0\0\0"
    p = tmp_path / "nomb.elf"
    p.write_bytes(bytes(img))
    rc, err = _run("--kernel", str(p))
    assert rc == 1 and "no Multiboot v1 header" in _one_error_line(err)


def test_bad_multiboot_checksum(tmp_path):
    p = tmp_path / "badsum.elf"
    p.write_bytes(multiboot_elf(HALT, bad_checksum=True))
    rc, err = _run("--kernel", str(p))
    assert rc == 1 and "checksum" in _one_error_line(err)


def test_memory_too_small_for_image(tmp_path):
    p = tmp_path / "big.elf"
    p.write_bytes(multiboot_elf(HALT, extra_bytes=40 << 20))
    rc, err = _run("--kernel", str(p), "-m", "32M")
    line = _one_error_line(err)
    assert rc == 1 and "needs 42 MiB" in line and "raise -m" in line


def test_bad_memory_size():
    rc, err = _run("--kernel", "kvstore", "-m", "lots")
    assert rc == 1 and "expected a size like 256M" in _one_error_line(err)
    rc, err = _run("--kernel", "kvstore", "-m", "8M")
    assert rc == 1 and "at least 16M" in _one_error_line(err)
    rc, err = _run("--kernel", "kvstore", "-m", "1e400")
    assert rc == 1 and "expected a size like 256M" in _one_error_line(err)


def test_malformed_chardev():
    rc, err = _run("--kernel", "kvstore", "--console", "tcp:localhost")
    assert rc == 1 and "--console" in _one_error_line(err) and "HOST:PORT" in err


def test_port_in_use():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        rc, err = _run("--kernel", "kvstore", "--console", "tcp:127.0.0.1:%d,server=on,wait=off" % port)
    finally:
        s.close()
    line = _one_error_line(err)
    assert rc == 1 and "pick another port" in line


def test_no_kvm_device():
    rc, err = _run("--kernel", "kvstore", env={"COLOCORE_KVM_DEVICE": "/nonexistent/kvm"})
    line = _one_error_line(err)
    assert rc == 1 and "no such device" in line and "KVM" in line


def test_kvm_not_permitted(tmp_path):
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    os.chmod(dev, 0)
    if os.geteuid() == 0:
        # root ignores file modes; a directory cannot be opened O_RDWR either way
        dev = tmp_path
    rc, err = _run("--kernel", "kvstore", env={"COLOCORE_KVM_DEVICE": str(dev)})
    assert rc == 1 and "cannot open" in _one_error_line(err)


@pytest.mark.parametrize("code,state,words", [(TRIPLE_FAULT, "guest-panicked", "triple-faulted"),
                                             (HALT, "guest-panicked", "halted for good")])
def test_guest_that_dies_is_reported(nodes, tmp_path, code, state, words):
    p = tmp_path / "dies.elf"
    p.write_bytes(multiboot_elf(code))
    node = nodes.start("dies", ["--kernel", str(p), "-m", "32M"])
    node.wait_monitor()
    import time
    deadline = time.monotonic() + 10
    while node.hmp("info status") != "VM status: paused (%s)" % state:
        assert time.monotonic() < deadline, node.hmp("info status")
        time.sleep(0.05)
    assert node.proc.poll() is None           # the node does not hang or die
    assert words in node.log_tail()
    assert node.hmp("cont").startswith("Error: cannot continue")
    node.hmp("quit")
    assert node.proc.wait(10) == 0
