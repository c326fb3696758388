"""The tree shows the architecture (docs/DESIGN.md, "Module map"): each package imports
only the packages below it, the engine never imports the tools, the clients or the
console, and no engine module grows past ~400 lines without saying why at its top."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "colocore")

# Top-level modules every package may import: the operator's errors, and the rules for
# what a node trusts (colocore/tls.py) and where it listens and writes (colocore/paths.py).
SHARED = ("errors", "tls", "paths")
# package -> the colocore packages it may import (besides itself and SHARED)
ALLOWED = {
    "guests": set(),          # the built guest images (package data)
    "vm": set(),
    "vmstate": set(),
    "migration": {"vmstate"},
    "colo": {"migration", "vmstate", "vm"},
    "net": {"vm"},
    "arbiter": set(),
    "control": {"vm", "vmstate", "migration", "colo", "net", "arbiter"},
    "clients": {"control"},
    "tools": {"clients", "control", "vm", "vmstate", "migration", "colo", "net", "arbiter"},
}
ENGINE = ("vm", "vmstate", "migration", "colo", "net", "arbiter", "control")
MAX_LINES = 400


def _modules():
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, PKG).split(os.sep)
                yield path, rel[0] if len(rel) > 1 else None


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, "%s: relative import (use colocore.PACKAGE...)" % path
            yield node.module


def test_packages_import_only_what_lies_below():
    bad = []
    for path, pkg in _modules():
        if pkg is None:
            continue
        assert pkg in ALLOWED, "colocore/%s is not in the module map" % pkg
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "colocore_tui" or (parts[0] == "textual" and pkg in ENGINE):
                bad.append("%s imports %s" % (os.path.relpath(path, ROOT), name))
            if parts[0] != "colocore" or len(parts) < 2 or parts[1] in SHARED + (pkg,):
                continue
            if parts[1] not in ALLOWED[pkg]:
                bad.append("%s imports %s" % (os.path.relpath(path, ROOT), name))
    assert not bad, "imports against the module map:\n" + "\n".join(bad)


def test_engine_modules_stay_small_or_say_why():
    long = []
    for path, pkg in _modules():
        if pkg not in ENGINE:
            continue
        text = open(path).read()
        n = text.count("\n")
        head = text[:3000].lower()
        if n > MAX_LINES and "long because" not in head:
            long.append("%s: %d lines" % (os.path.relpath(path, ROOT), n))
    assert not long, "engine modules over %d lines without a reason at the top " \
                     "('... long because ...'):\n%s" % (MAX_LINES, "\n".join(long))
