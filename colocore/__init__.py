"""colocore: COLO-style fault tolerance for KVM guests.

The engine is headless: nothing under colocore/ imports textual or the console (tui/).
"""
__version__ = "0.1.0"
