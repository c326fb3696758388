"""Build colocore: the Cython hot path (colocore_ext) and the guest images.

A failed extension or guest build fails the install loudly; there is no pure-Python
fallback (it would hide a broken build and run at a fraction of the speed).
"""
import glob
import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.exit("colocore: Cython is required to build colocore_ext; "
                 "install it first (pip install cython) and retry")
    sources = sorted(glob.glob(os.path.join("colocore_ext", "*.pyx")))
    exts = [Extension("colocore_ext." + os.path.splitext(os.path.basename(s))[0], [s],
                      extra_compile_args=["-O3", "-march=x86-64-v2", "-Wno-unused-function"])
            for s in sources]
    return cythonize(exts, language_level=3, quiet=True)


class StrictBuildExt(build_ext):
    """Turn any compiler failure into one clear message and a failed install."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - re-raised as a clear failure
            sys.exit("colocore: building the Cython extensions failed (%s). colocore has no "
                     "pure-Python fallback: install gcc and the Python headers "
                     "(apt-get install gcc python3-dev) and retry." % exc)


def _build_guests(out_dir):
    sys.path.insert(0, os.path.join(HERE, "guests"))
    try:
        import build_guests
    finally:
        sys.path.pop(0)
    try:
        build_guests.build(out_dir)
    except Exception as exc:  # noqa: BLE001
        sys.exit("colocore: building the guest images failed (%s); they need gcc with "
                 "-m32/-m64 support and GNU ld" % exc)


class BuildPyWithGuests(build_py):
    def run(self):
        super().run()
        _build_guests(os.path.join(self.build_lib, "colocore", "guests"))


class BuildExtWithGuests(StrictBuildExt):
    def run(self):
        super().run()
        if self.inplace:   # editable / develop installs: images live in the source tree
            _build_guests(os.path.join(HERE, "colocore", "guests"))


setup(
    name="colocore",
    version="0.1.0",
    description="COLO-style fault tolerance for KVM guests: a micro-VMM, checkpoints, failover",
    # every package found (a hand-kept list once left colocore.devices out of
    # non-editable installs)
    packages=find_packages(include=["colocore", "colocore.*", "colocore_ext", "colocore_ext.*",
                                    "colocore_tui", "colocore_tui.*"]),
    package_data={"colocore.guests": ["*.elf"], "colocore_ext": ["*.pyi", "*.pxd"],
                  "colocore_ext.includes": ["*.pxd"],
                  "colocore_tui": ["*.tcss"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtWithGuests, "build_py": BuildPyWithGuests},
    python_requires=">=3.11",
    install_requires=["textual", "psutil", "lz4", "pyroute2", "etcd3gw", "requests"],
    extras_require={"test": ["pytest", "pytest-timeout", "hypothesis", "qemu.qmp",
                             "pytest-textual-snapshot", "redis", "atheris"]},
    entry_points={"console_scripts": ["colocore=colocore.cli:main",
                                      "colocore-tui=colocore_tui.app:main"]},
)
