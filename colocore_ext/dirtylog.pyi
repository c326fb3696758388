from array import array

MAX_SLOT_SIZE: int

def enable_manual_protect(vm_fd: int) -> bool: ...

class DirtyLog:
    vm_fd: int
    slot: int
    host_addr: int
    size: int
    gpa_base: int
    npages: int
    manual_protect: bool
    last_get_us: float
    last_clear_us: float
    last_convert_us: float
    last_count: int
    def __init__(self, vm_fd: int, slot: int, host_addr: int, size: int,
                 manual_protect: bool = ..., gpa_base: int = ...) -> None: ...
    def mark(self, pfn: int) -> None: ...
    def mark_range(self, gpa: int, length: int) -> None: ...
    def count(self) -> int: ...
    def harvest(self) -> array: ...
