"""Guest RAM: the mapping, and which pages were written since the last harvest.

KVM's dirty log sees the guest's own writes; pages the VMM writes itself (device
emulation on the vCPU thread) are marked in a software bitmap and OR'ed in at harvest.
"""
import array

from colocore_ext import dirtylog

PAGE = 4096


class GuestMemory:
    def __init__(self, vm):
        self.vm = vm
        self.ram = vm.memory()
        self.size = vm.mem_size
        self.npages = self.size // PAGE
        self.dirty = dirtylog.DirtyLog(vm.fd, 0, vm.mem_addr, vm.mem_size,
                                       manual_protect=vm.manual_protect)

    def mark_dirty(self, gpa, length):
        """Device emulation wrote guest RAM: KVM did not see it, the software bitmap does."""
        self.dirty.mark_range(gpa, length)

    def harvest(self):
        """Page numbers dirtied since the last harvest (vCPU must be parked)."""
        return self.dirty.harvest()

    def all_pages(self):
        return array.array("I", range(self.npages))
