# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Split virtqueues (virtio 1.x) in guest RAM, the device side, for every virtio device.

`Virtqueue` holds one queue's registers and ring positions (what the transport
programs and what snapshots carry); its methods walk descriptor chains and return used
buffers with bounds and loop checks, marking every byte the device writes dirty in the
software bitmap (KVM's dirty log never sees device writes).

The virtio-console drives it from Python (`pop`, `push_used`, `publish`): a console moves
little. virtio-net moves frames, so its whole path is here in C (`NetPath`): one call per
exit moves every frame between the tap fd and the rings, with no Python per frame:
- `rx_fill(fd)` reads frames straight from the tap into posted receive buffers
  (readv, one frame per read, a scratch tail catches frames longer than the buffer);
- `tx_drain()` copies every available transmit chain into the `FrameQueue`;
- `FrameQueue` is the output-commit queue of transmitted frames: numbered as produced,
  written to the tap only up to `releasable` (everything at once outside COLO).
The ring code runs on the vCPU thread only. The FrameQueue is shared with the thread that
releases output (the COLO loop, a failover): it has a mutex of its own (see its doc).
"""
from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memset, memmove
from posix.unistd cimport read, write
from colocore_ext.dirtylog cimport DirtyLog
from colocore_ext.includes.pthread cimport (pthread_mutex_t, pthread_mutex_init,
                                            pthread_mutex_destroy, pthread_mutex_lock,
                                            pthread_mutex_trylock, pthread_mutex_unlock)

import os

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t readv(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int MSG_DONTWAIT

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC

cdef enum:
    VRING_DESC_F_NEXT = 1
    VRING_DESC_F_WRITE = 2
    VRING_DESC_F_INDIRECT = 4
    MAX_CHAIN = 64
    VNET_HDR = 12
    MAX_FRAME = 65536           # largest frame the device takes from the guest
    SCRATCH = 65536

cdef uint64_t FNV_OFFSET_C = 14695981039346656037ULL


class VirtqueueError(Exception):
    """The driver programmed the queue wrongly; the device then needs a reset."""


cdef class GuestRam:
    """Guest RAM as the devices see it: a base pointer, a size, the software dirty log."""
    cdef uint8_t *base
    cdef uint64_t size
    cdef DirtyLog dirty
    cdef object _view

    def __cinit__(self, ram, DirtyLog dirty=None):
        # dirty=None: RAM that no dirty log follows (unit tests of the ring code)
        cdef uint8_t[::1] mv = ram
        self._view = ram
        self.base = &mv[0]
        self.size = mv.shape[0]
        self.dirty = dirty

    cdef inline bint ok(self, uint64_t gpa, uint64_t length) noexcept nogil:
        return gpa <= self.size and length <= self.size - gpa

    cdef inline void put16(self, uint64_t gpa, uint16_t v) noexcept nogil:
        memcpy(self.base + gpa, &v, 2)
        self.mark(gpa, 2)

    cdef inline void mark(self, uint64_t gpa, uint64_t length) noexcept nogil:
        if self.dirty is not None:
            self.dirty.mark_range_nogil(gpa, length)


cdef class Virtqueue:
    """One split virtqueue: size, ready, ring addresses, the device's ring positions."""
    cdef public uint32_t num
    cdef public uint32_t ready
    cdef public uint64_t desc, driver, device
    cdef public uint16_t last_avail, used_idx

    def __cinit__(self):
        self.reset()

    def reset(self):
        self.num = 0
        self.ready = 0
        self.desc = self.driver = self.device = 0
        self.last_avail = self.used_idx = 0

    def save(self):
        return dict(num=self.num, ready=self.ready, desc=self.desc, driver=self.driver,
                    device=self.device, last_avail=self.last_avail, used_idx=self.used_idx)

    def load(self, s):
        self.num = int(s["num"])
        self.ready = int(s["ready"])
        self.desc = int(s["desc"])
        self.driver = int(s["driver"])
        self.device = int(s["device"])
        self.last_avail = int(s["last_avail"])
        self.used_idx = int(s["used_idx"])

    # ---- C level -----------------------------------------------------------------

    cdef int check(self, GuestRam ram) except -1:
        """The rings themselves lie in RAM (checked once per call, not per entry)."""
        if not ram.ok(self.driver, 6 + 2 * self.num) or not ram.ok(self.device, 6 + 8 * self.num) \
                or not ram.ok(self.desc, 16 * <uint64_t>self.num):
            raise VirtqueueError("queue rings at desc 0x%x avail 0x%x used 0x%x lie outside RAM"
                                 % (self.desc, self.driver, self.device))
        return 0

    cdef inline uint16_t avail_idx(self, GuestRam ram) noexcept nogil:
        cdef uint16_t v
        memcpy(&v, ram.base + self.driver + 2, 2)
        return v

    cdef inline uint16_t avail_head(self, GuestRam ram) noexcept nogil:
        cdef uint16_t v
        memcpy(&v, ram.base + self.driver + 4 + 2 * (self.last_avail % self.num), 2)
        return v

    cdef int chain(self, GuestRam ram, uint16_t head, iovec *iov, int *writable) except -2:
        """Fill iov with the chain starting at head (at most MAX_CHAIN buffers); returns
        their number. writable: 1 if every buffer is device-writable, 0 if none is."""
        cdef uint32_t i = head, n = 0, steps
        cdef uint64_t addr
        cdef uint32_t length
        cdef uint16_t flags, nxt
        cdef uint8_t *d
        cdef int w = -1, this_w
        for steps in range(self.num):
            if i >= self.num:
                raise VirtqueueError("descriptor index %d past queue size %d" % (i, self.num))
            d = ram.base + self.desc + 16 * i
            memcpy(&addr, d, 8)
            memcpy(&length, d + 8, 4)
            memcpy(&flags, d + 12, 2)
            memcpy(&nxt, d + 14, 2)
            if flags & VRING_DESC_F_INDIRECT:
                raise VirtqueueError("indirect descriptors were not negotiated")
            if not ram.ok(addr, length):
                raise VirtqueueError("guest address 0x%x+%d outside RAM" % (addr, length))
            this_w = 1 if flags & VRING_DESC_F_WRITE else 0
            if w < 0:
                w = this_w
            elif w != this_w:
                w = 2
            if n == MAX_CHAIN:
                raise VirtqueueError("descriptor chain longer than %d buffers" % MAX_CHAIN)
            iov[n].iov_base = ram.base + addr
            iov[n].iov_len = length
            n += 1
            if not flags & VRING_DESC_F_NEXT:
                writable[0] = w
                return n
            i = nxt
        raise VirtqueueError("descriptor chain loops")

    cdef inline void used(self, GuestRam ram, uint32_t head, uint32_t written) noexcept nogil:
        cdef uint64_t slot = self.device + 4 + 8 * (self.used_idx % self.num)
        memcpy(ram.base + slot, &head, 4)
        memcpy(ram.base + slot + 4, &written, 4)
        ram.mark(slot, 8)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    cdef inline void publish_used(self, GuestRam ram) noexcept nogil:
        ram.put16(self.device + 2, self.used_idx)

    # ---- Python level (the console) ---------------------------------------------------

    def pop(self, GuestRam ram):
        """Take the next available chain: (head, [(gpa, length, writable), ...]), or None."""
        cdef iovec iov[MAX_CHAIN]
        cdef int w, k, n
        self.check(ram)
        if self.num == 0 or self.avail_idx(ram) == self.last_avail:
            return None
        head = self.avail_head(ram)
        n = self.chain(ram, head, iov, &w)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        bufs = []
        for k in range(n):
            bufs.append((<uint64_t>(<uint8_t *>iov[k].iov_base - ram.base), iov[k].iov_len,
                         w == 1 or (w == 2 and _desc_writable(ram, self, head, k))))
        return head, bufs

    def push_used(self, GuestRam ram, uint32_t head, uint32_t written):
        self.used(ram, head, written)

    def publish(self, GuestRam ram):
        self.publish_used(ram)


cdef bint _desc_writable(GuestRam ram, Virtqueue q, uint32_t head, int k):
    """Mixed chains (rare): the k-th buffer's own WRITE flag."""
    cdef uint32_t i = head
    cdef uint16_t flags, nxt
    for _ in range(k):
        memcpy(&nxt, ram.base + q.desc + 16 * i + 14, 2)
        i = nxt
    memcpy(&flags, ram.base + q.desc + 16 * i + 12, 2)
    return (flags & VRING_DESC_F_WRITE) != 0


cdef uint64_t fnv1a(const uint8_t *p, size_t n, uint64_t h) noexcept nogil:
    cdef size_t i
    for i in range(n):
        h = (h ^ p[i]) * 1099511628211ULL
    return h


FNV_OFFSET = FNV_OFFSET_C


cdef inline uint64_t chain_step(uint64_t chain, uint64_t h) noexcept nogil:
    """One frame more in the hash of a sequence of frames (order matters): what a COLO
    secondary folds over its log to check that it holds exactly the frames a checkpoint's
    guest consumed, in that order (net/inputlog.py)."""
    return (chain ^ h) * 1099511628211ULL


def chain_hash(uint64_t chain, uint64_t h):
    return chain_step(chain, h)


cdef class FrameQueue:
    """Frames the guest sent, numbered as produced, released to the tap up to a mark.

    Outside COLO `hold` is False and every frame is releasable at once; in COLO the
    checkpoint loop moves the mark when the secondary has the state that produced them
    (output commit, like devices.output.OutputChannel for console bytes). Frames not yet
    written are device state: `save()` returns them, a node that loads them sends them.
    Storage: one buffer of [u32 length][frame] records, at most `max_bytes` of them
    (beyond it a frame is dropped as a full wire would drop it, counted in `dropped`:
    the guest's TCP sends it again).

    Two threads use a queue at once in COLO: the vCPU thread appends (tx_drain) and
    flushes what is releasable after each transmit notify, while the COLO thread releases
    a checkpoint's frames and flushes them at once (the guest may be idle in WAIT and
    flush nothing for a while). One mutex guards the buffer and the marks, and a flush
    writes with the mutex held: a frame is written by one thread only, frames go out in
    order (frame k+1's write starts after frame k's returned), and the buffer is never
    moved (realloc, compaction) under a write that reads it. The writes themselves run
    without the GIL. Nobody ever waits for the mutex while holding the GIL (`_lock`), so
    a thread that holds the mutex and wants the GIL back cannot deadlock with one that
    holds the GIL and wants the mutex. `produced` is read without the mutex: a counter
    read, taken at a checkpoint's pause with the vCPU parked."""
    cdef uint8_t *buf
    cdef size_t cap, used_bytes, head_off
    cdef pthread_mutex_t mu
    cdef public uint64_t base          # sequence number of the first pending frame
    cdef public uint64_t produced
    cdef public uint64_t releasable
    cdef public bint hold
    cdef public uint64_t written, write_errors, last_errno
    cdef public uint64_t dropped       # frames refused because max_bytes were held
    cdef public size_t max_bytes

    def __cinit__(self, size_t max_bytes=32 << 20):
        self.cap = 1 << 16
        self.buf = <uint8_t *>malloc(self.cap)
        if self.buf == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.mu, NULL)
        self.used_bytes = self.head_off = 0
        self.base = self.produced = self.releasable = 0
        self.hold = False
        self.max_bytes = max_bytes

    def __dealloc__(self):
        free(self.buf)
        pthread_mutex_destroy(&self.mu)

    cdef inline void _lock(self):
        if pthread_mutex_trylock(&self.mu) != 0:
            with nogil:
                pthread_mutex_lock(&self.mu)

    cdef inline void _unlock(self) noexcept nogil:
        pthread_mutex_unlock(&self.mu)

    cdef int reserve(self, size_t n) except -1:
        """Room for n more bytes (the mutex held)."""
        cdef uint8_t *nb
        cdef size_t live = self.used_bytes - self.head_off
        if self.head_off and self.head_off * 2 >= self.used_bytes:
            memmove(self.buf, self.buf + self.head_off, live)
            self.used_bytes = live
            self.head_off = 0
        if self.used_bytes + n <= self.cap:
            return 0
        while self.used_bytes + n > self.cap:
            self.cap *= 2
        nb = <uint8_t *>realloc(self.buf, self.cap)
        if nb == NULL:
            raise MemoryError()
        self.buf = nb
        return 0

    cdef uint8_t *append(self, uint32_t length) except? NULL:
        """A record for a frame of `length` bytes (the mutex held; NULL: dropped, the
        queue holds max_bytes already)."""
        cdef uint8_t *p
        if self.used_bytes - self.head_off + 4 + length > self.max_bytes:
            self.dropped += 1
            return NULL
        self.reserve(4 + length)
        p = self.buf + self.used_bytes
        memcpy(p, &length, 4)
        self.used_bytes += 4 + length
        self.produced += 1
        if not self.hold:
            self.releasable = self.produced
        return p + 4

    @property
    def pending(self):
        return self.produced - self.base

    def release(self, upto=None):
        """Allow frames up to sequence `upto` (all when None) to go out."""
        self._lock()
        if upto is None:
            self.releasable = self.produced
        else:
            self.releasable = max(self.releasable, min(int(upto), self.produced))
        self._unlock()

    cdef int _flush_locked(self, int fd) noexcept nogil:
        cdef uint32_t length
        cdef ssize_t r
        cdef int e = 0
        while self.base < self.releasable:
            memcpy(&length, self.buf + self.head_off, 4)
            if fd >= 0:
                r = write(fd, self.buf + self.head_off + 4, length)
                if r < 0:
                    e = errno
                    if e == EINTR:
                        continue
                    self.write_errors += 1
                    self.last_errno = e
                    if e == EAGAIN:
                        break               # the tap is full: try again at the next exit
                    # any other error (a frame the tap refuses, a tap that is down or
                    # gone) loses this frame, as a wire would; the caller reports it
                else:
                    self.written += 1
            self.head_off += 4 + length
            self.base += 1
        if self.head_off == self.used_bytes:
            self.head_off = self.used_bytes = 0
        return e

    def flush(self, int fd):
        """Write the releasable frames to fd (one write each), from whichever thread
        calls. Returns the errno of the first failure that ends the flush (0 if none);
        frames the tap refused one by one (a frame it cannot take) are dropped and
        counted, never retried."""
        cdef int e
        self._lock()
        with nogil:
            e = self._flush_locked(fd)
            self._unlock()
        return e

    def drop_all(self):
        """Forget every pending frame (a device reset)."""
        self._lock()
        self.head_off = self.used_bytes = 0
        self.base = self.releasable = self.produced
        self._unlock()

    cdef bytes _records(self, uint64_t first, uint64_t upto):
        """The [u32 len][frame] records of frames first..upto-1 (the mutex held; first
        and upto within base..produced)."""
        cdef size_t off = self.head_off, start
        cdef uint64_t seq = self.base
        cdef uint32_t length
        while seq < first:
            memcpy(&length, self.buf + off, 4)
            off += 4 + length
            seq += 1
        start = off
        while seq < upto:
            memcpy(&length, self.buf + off, 4)
            off += 4 + length
            seq += 1
        return (<char *>self.buf)[start:off] if off > start else b""

    def save(self):
        """(base, produced, blob of [u32 len][frame] records) of the pending frames."""
        self._lock()
        try:
            return {"base": self.base, "produced": self.produced,
                    "frames": self._records(self.base, self.produced)}
        finally:
            self._unlock()

    def save_upto(self, uint64_t produced):
        """The state save() would have returned when `produced` frames had been made,
        taken later (a COLO checkpoint copies its held frames after the guest resumed,
        not on the pause path). Frames after `produced` are left out; frames written to
        the tap since then are left out too (the base moved past them): a node that
        loads this state must not send them again, they are on the wire already."""
        cdef uint64_t first
        self._lock()
        try:
            upto = min(produced, self.produced)
            first = min(self.base, upto)
            return {"base": first, "produced": upto, "frames": self._records(first, upto)}
        finally:
            self._unlock()

    def load(self, s):
        """Load a state check_frames() accepted."""
        cdef bytes blob = bytes(s["frames"])
        check_frames(blob, s["base"], s["produced"])
        self._lock()
        try:
            self.head_off = self.used_bytes = 0
            self.reserve(len(blob))
            if len(blob):
                memcpy(self.buf, <char *>blob, len(blob))
            self.used_bytes = len(blob)
            self.base = s["base"]
            self.produced = s["produced"]
            self.releasable = self.base if self.hold else self.produced
        finally:
            self._unlock()

    def frames_since(self, uint64_t seq):
        """(first, frames): the pending frames from sequence number `seq` on (from the
        oldest pending one if `seq` was written already), as a list of bytes, `first` the
        sequence number of the first. Hybrid COLO's comparer reads what the guest produced
        with it, one call per wake-up."""
        cdef size_t off
        cdef uint32_t length
        cdef uint64_t at
        out = []
        self._lock()
        try:
            off = self.head_off
            at = self.base
            while at < seq and off < self.used_bytes:
                memcpy(&length, self.buf + off, 4)
                off += 4 + length
                at += 1
            first = at
            while off < self.used_bytes:
                memcpy(&length, self.buf + off, 4)
                out.append((<char *>self.buf)[off + 4:off + 4 + length])
                off += 4 + length
        finally:
            self._unlock()
        return first, out

    def frames(self):
        """The pending frames as a list of bytes (tests, tools)."""
        return self.frames_since(0)[1]


def check_frames(bytes blob, uint64_t base, uint64_t produced):
    """Raise ValueError unless `blob` is well-formed [u32 len][frame] records, as many as
    produced - base says (a FrameQueue's saved state, checked before it is loaded)."""
    cdef size_t off = 0, count = 0
    cdef uint32_t length
    while off < <size_t>len(blob):
        if off + 4 > <size_t>len(blob):
            raise ValueError("net-out: truncated frame record")
        memcpy(&length, <char *>blob + off, 4)
        if length > MAX_FRAME or off + 4 + length > <size_t>len(blob):
            raise ValueError("net-out: frame record of %d bytes overruns the state" % length)
        off += 4 + length
        count += 1
    if produced < base or produced - base != count:
        raise ValueError("net-out: %d frames stored, %d announced" % (count, produced - base))


cdef class NetPath:
    """virtio-net's frame path between a tap fd and the two queues (see the module doc)."""
    cdef GuestRam ram
    cdef public Virtqueue rxq, txq
    cdef public FrameQueue out
    cdef uint8_t *scratch
    # counters (device state: they travel with the guest)
    cdef public uint64_t rx_frames, rx_bytes, rx_dropped_runt, rx_dropped_oversize
    cdef public uint64_t tx_frames, tx_bytes, tx_dropped
    cdef public uint64_t rx_consumed      # frames handed to the guest, ever
    cdef public uint64_t rx_last_hash     # FNV-1a 64 of the last of them
    cdef public uint64_t rx_chain         # all of them, in order: chain_hash(chain, hash)
    cdef public int last_errno
    # hybrid COLO (not device state): `tee_fd`, a packet socket on the mirror link, gets a
    # copy of every frame the guest sends (a secondary's output toward the primary's
    # comparer; a failed send is counted in tee_dropped, the comparer's timeout covers
    # it); `notify_fd`, an eventfd, is written once per tx_drain that took frames (wakes
    # the primary's comparer)
    cdef public int tee_fd, notify_fd
    cdef public uint64_t tee_sent, tee_dropped

    def __cinit__(self, GuestRam ram, Virtqueue rxq, Virtqueue txq, FrameQueue out):
        self.ram = ram
        self.rxq = rxq
        self.txq = txq
        self.out = out
        self.scratch = <uint8_t *>malloc(SCRATCH)
        if self.scratch == NULL:
            raise MemoryError()
        self.rx_last_hash = FNV_OFFSET_C
        self.rx_chain = FNV_OFFSET_C
        self.tee_fd = -1
        self.notify_fd = -1

    def __dealloc__(self):
        free(self.scratch)

    def rx_ready(self):
        """Whether a receive buffer is posted (so a readable tap should wake WAIT)."""
        if not self.rxq.ready or self.rxq.num == 0:
            return False
        self.rxq.check(self.ram)
        return self.rxq.avail_idx(self.ram) != self.rxq.last_avail

    def rx_fill(self, int fd):
        """Read frames from fd into posted receive buffers until either runs out.
        Returns the number of frames delivered; sets last_errno to the errno that
        ended the reads when it was not EAGAIN (0 otherwise)."""
        cdef Virtqueue q = self.rxq
        cdef GuestRam ram = self.ram
        cdef iovec iov[MAX_CHAIN + 1]
        cdef int n, w, k
        cdef uint16_t head, avail
        cdef ssize_t r
        cdef size_t room, got, left, take
        cdef uint64_t h
        cdef int delivered = 0, e = 0
        cdef uint8_t *hdr
        self.last_errno = 0
        if not q.ready or q.num == 0 or fd < 0:
            return 0
        q.check(ram)
        avail = q.avail_idx(ram)
        while q.last_avail != avail:
            head = q.avail_head(ram)
            n = q.chain(ram, head, iov, &w)
            if w != 1:
                raise VirtqueueError("receive chain %d has device-readable buffers" % head)
            room = 0
            for k in range(n):
                room += iov[k].iov_len
            if room < VNET_HDR + 14:
                raise VirtqueueError("receive buffer of %d bytes cannot hold a frame" % room)
            # the header goes first; the frame follows, then a scratch tail that catches
            # frames longer than the buffer (they are dropped, not truncated)
            hdr = <uint8_t *>iov[0].iov_base
            if iov[0].iov_len >= VNET_HDR:
                iov[0].iov_base = hdr + VNET_HDR
                iov[0].iov_len -= VNET_HDR
                k = 0
            else:
                raise VirtqueueError("receive buffer's first descriptor is shorter than the "
                                     "12-byte virtio_net_hdr")
            iov[n].iov_base = self.scratch
            iov[n].iov_len = SCRATCH
            with nogil:
                r = readv(fd, iov, n + 1)
            if r < 0:
                e = errno
                if e == EINTR:
                    continue
                break
            got = <size_t>r
            if got > room - VNET_HDR:
                self.rx_dropped_oversize += 1
                continue                      # the same buffer takes the next frame
            if got < 14:
                self.rx_dropped_runt += 1
                continue
            memset(hdr, 0, VNET_HDR)
            hdr[10] = 1                       # num_buffers = 1 (VERSION_1 layout)
            # hash the frame (for the secondary's input log) and mark what we wrote dirty
            h = FNV_OFFSET_C
            left = got
            for k in range(n):
                take = iov[k].iov_len if iov[k].iov_len < left else left
                if take:
                    h = fnv1a(<uint8_t *>iov[k].iov_base, take, h)
                    ram.mark(<uint64_t>(<uint8_t *>iov[k].iov_base - ram.base), take)
                left -= take
            ram.mark(<uint64_t>(hdr - ram.base), VNET_HDR)
            q.used(ram, head, <uint32_t>(got + VNET_HDR))
            q.last_avail = (q.last_avail + 1) & 0xFFFF
            delivered += 1
            self.rx_frames += 1
            self.rx_bytes += got
            self.rx_consumed += 1
            self.rx_last_hash = h
            self.rx_chain = chain_step(self.rx_chain, h)
            if q.last_avail == avail:
                avail = q.avail_idx(ram)      # the guest may have posted more meanwhile
        if delivered:
            q.publish_used(ram)
        if e != EAGAIN:
            self.last_errno = e
        return delivered

    def tx_drain(self):
        """Take every available transmit chain into the FrameQueue; returns frames taken."""
        cdef Virtqueue q = self.txq
        cdef GuestRam ram = self.ram
        cdef uint16_t avail
        cdef int taken
        cdef FrameQueue out = self.out
        if not q.ready or q.num == 0:
            return 0
        q.check(ram)
        avail = q.avail_idx(ram)
        cdef uint64_t one = 1
        out._lock()
        try:
            taken = self._drain(q, ram, avail, out)
        finally:
            out._unlock()
        q.publish_used(ram)
        if taken and self.notify_fd >= 0:
            write(self.notify_fd, &one, 8)
        return taken

    cdef int _drain(self, Virtqueue q, GuestRam ram, uint16_t avail, FrameQueue out) except -1:
        cdef iovec iov[MAX_CHAIN]
        cdef int n, w, k
        cdef uint16_t head
        cdef size_t total, skip, off, part
        cdef uint8_t *dst
        cdef int taken = 0
        while q.last_avail != avail:
            head = q.avail_head(ram)
            n = q.chain(ram, head, iov, &w)
            q.last_avail = (q.last_avail + 1) & 0xFFFF
            q.used(ram, head, 0)
            total = 0
            for k in range(n):
                total += iov[k].iov_len
            if w != 0 or total < VNET_HDR + 14 or total - VNET_HDR > MAX_FRAME:
                self.tx_dropped += 1          # not a frame: returned, not sent
                continue
            if self.tee_fd >= 0:
                self._tee(iov, n)
            dst = out.append(<uint32_t>(total - VNET_HDR))
            if dst == NULL:
                continue                      # the held frames are at their bound
            skip = VNET_HDR
            off = 0
            for k in range(n):
                part = iov[k].iov_len
                if skip >= part:
                    skip -= part
                    continue
                memcpy(dst + off, <uint8_t *>iov[k].iov_base + skip, part - skip)
                off += part - skip
                skip = 0
            taken += 1
            self.tx_frames += 1
            self.tx_bytes += total - VNET_HDR
        return taken

    cdef void _tee(self, iovec *iov, int n) noexcept nogil:
        """Send one transmit chain, without its virtio_net_hdr, to tee_fd (never blocks)."""
        cdef iovec part[MAX_CHAIN]
        cdef msghdr msg
        cdef int k, m = 0
        cdef size_t skip = VNET_HDR
        for k in range(n):
            if skip >= iov[k].iov_len:
                skip -= iov[k].iov_len
                continue
            part[m].iov_base = <uint8_t *>iov[k].iov_base + skip
            part[m].iov_len = iov[k].iov_len - skip
            skip = 0
            m += 1
        memset(&msg, 0, sizeof(msg))
        msg.msg_iov = part
        msg.msg_iovlen = m
        if sendmsg(self.tee_fd, &msg, MSG_DONTWAIT) < 0:
            self.tee_dropped += 1
        else:
            self.tee_sent += 1

    COUNTERS = ("rx_frames", "rx_bytes", "rx_dropped_runt", "rx_dropped_oversize",
                "tx_frames", "tx_bytes", "tx_dropped", "rx_consumed", "rx_last_hash",
                "rx_chain")

    def counters(self):
        return {k: getattr(self, k) for k in self.COUNTERS}

    def load_counters(self, s):
        for k in self.COUNTERS:
            setattr(self, k, s[k])


def frame_hash(frame):
    """FNV-1a 64 of a frame, as `NetPath.rx_last_hash` computes it."""
    cdef const uint8_t[::1] mv = frame
    return fnv1a(&mv[0], mv.shape[0], FNV_OFFSET_C) if mv.shape[0] else FNV_OFFSET_C


cdef class Wakeup:
    """What ends a WAIT: an eventfd that `set()` writes (input, a pause), and optionally
    a readable fd (the tap). `wait()` sleeps in poll() without the GIL."""
    cdef readonly int fd

    def __cinit__(self):
        self.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(errno, "eventfd: %s" % os.strerror(errno))

    def set(self):
        cdef uint64_t one = 1
        write(self.fd, &one, 8)

    def clear(self):
        cdef uint64_t v
        read(self.fd, &v, 8)

    def wait(self, double timeout, int extra_fd=-1):
        """Sleep until set(), extra_fd readable, or timeout seconds; True if woken."""
        cdef pollfd fds[2]
        cdef int r, nfds = 1
        cdef int ms = <int>(timeout * 1000.0 + 0.999)
        fds[0].fd = self.fd
        fds[0].events = POLLIN
        fds[0].revents = 0
        if extra_fd >= 0:
            fds[1].fd = extra_fd
            fds[1].events = POLLIN
            fds[1].revents = 0
            nfds = 2
        with nogil:
            r = poll(fds, nfds, ms)
        return r > 0

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __dealloc__(self):
        if self.fd >= 0:
            os.close(self.fd)
