"""External C declarations shared by colocore_ext's modules (uvloop's habit): the Linux
KVM and userfaultfd ABIs, POSIX threads, and the bit and page helpers every module needs.
Only .pxd files live here; nothing to import at run time."""
