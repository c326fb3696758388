"""colocore runs headless: importing the engine (every module of it) never loads Textual
or the console (harlequin's check)."""
import subprocess
import sys

CODE = r"""
import importlib, pkgutil, sys
import colocore
for mod in pkgutil.walk_packages(colocore.__path__, "colocore."):
    if not mod.name.endswith("__main__"):
        importlib.import_module(mod.name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("textual", "colocore_tui"))
print(" ".join(bad))
"""


def test_engine_does_not_import_textual():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", "the engine imported UI modules: %s" % out.stdout
