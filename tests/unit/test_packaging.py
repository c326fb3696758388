"""`pip install .` ships every module: build the wheel from this tree and compare its
contents with the source tree (a hand-kept package list once left colocore.devices out,
which only a non-editable install showed)."""
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_wheel_contains_every_module_extension_and_guest(tmp_path):
    src = tmp_path / "src"
    # a clean copy: what git tracks, as CI's clone has it
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        dst = src / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(open(os.path.join(ROOT, f), "rb").read())
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(src)], check=True,
                   capture_output=True, timeout=600)
    (wheel,) = list(out.glob("colocore-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for f in files:
        if f.endswith(".py") and f.startswith("colocore/"):
            expected.add(f)
        elif f.endswith(".py") and f.startswith("tui/"):
            expected.add("colocore_tui/" + f[len("tui/"):])
    missing = sorted(expected - names)
    assert not missing, "not in the wheel: %s" % missing
    for ext in ("kvm", "dirtylog", "pages", "xbzrle", "lz4batch", "virtq", "capture"):
        assert any(n.startswith("colocore_ext/%s." % ext) and n.endswith(".so") for n in names), ext
    for guest in ("kvstore", "dirtier", "kvnet"):
        assert "colocore/guests/%s.elf" % guest in names
    assert "colocore_tui/console.tcss" in names
    assert not any(n.startswith("tui/") for n in names)
