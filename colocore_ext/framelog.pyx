# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The COLO secondary's log of mirrored frames (colocore/net/inputlog.py drives it).

The primary's kernel mirrors every frame that reaches its tap toward the guest to a link
toward the secondary; the secondary reads that link with an AF_PACKET socket into this
log. `fill(fd)` reads every frame waiting on the socket in one call, with no Python per
frame, and keeps each with its sequence number (arrival order) and its FNV-1a 64 hash
(the hash virtio-net keeps of the last frame its guest consumed, `rx_last_hash`), so that
a checkpoint's `rx_consumed`/`rx_last_hash` can be matched against the log.

Bounded: at most `max_frames` frames and `max_bytes` bytes; a frame that does not fit
evicts the oldest ones (`evicted` counts them, `evicted_through` is the newest sequence
number evicted). Storage: one byte ring plus an index ring (offset, length, hash) per
frame. Every method runs with the GIL held from start to end (no `nogil` inside), so the
reader thread and the COLO threads never interleave inside one call.
"""
from libc.errno cimport errno, EAGAIN, EINTR, ENOBUFS
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

import os

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    ssize_t recvfrom(int fd, void *buf, size_t n, int flags, sockaddr *addr, socklen_t *alen)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    int MSG_DONTWAIT
    int MSG_TRUNC
    int SOL_PACKET

cdef extern from "<linux/if_packet.h>" nogil:
    struct sockaddr_ll:
        unsigned short sll_family
        unsigned short sll_protocol
        int sll_ifindex
        unsigned short sll_hatype
        unsigned char sll_pkttype
        unsigned char sll_halen
        unsigned char sll_addr[8]
    struct tpacket_stats:
        unsigned int tp_packets
        unsigned int tp_drops
    int PACKET_OUTGOING
    int PACKET_STATISTICS

cdef enum:
    SCRATCH = 65536
    FILL_BUDGET = 8192          # frames read per fill() call at most (bounds a GIL hold)

cdef uint64_t FNV_OFFSET_C = 14695981039346656037ULL


cdef inline uint64_t fnv1a(const uint8_t *p, size_t n) noexcept nogil:
    cdef uint64_t h = FNV_OFFSET_C
    cdef size_t i
    for i in range(n):
        h = (h ^ p[i]) * 1099511628211ULL
    return h


cdef class FrameLog:
    cdef uint8_t *buf
    cdef uint8_t *scratch
    cdef uint32_t *off
    cdef uint32_t *length
    cdef uint64_t *hashes
    cdef readonly size_t max_frames, max_bytes
    cdef size_t head_idx, count
    cdef size_t head_byte, tail_byte
    cdef readonly uint64_t first          # sequence number of the oldest frame kept
    cdef readonly uint64_t next           # sequence number the next frame gets
    cdef readonly uint64_t bytes_held
    cdef readonly uint64_t evicted        # frames dropped to make room, ever
    cdef readonly int64_t evicted_through  # newest sequence number evicted (-1: none)
    cdef readonly uint64_t too_big        # frames larger than the whole log (dropped)
    cdef readonly uint64_t outgoing       # frames this host sent on the link (skipped)

    def __cinit__(self, size_t max_frames=4096, size_t max_bytes=8 << 20):
        if max_frames < 1 or max_bytes < SCRATCH:
            raise ValueError("a frame log needs room for one frame of 64 KiB at least")
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.buf = <uint8_t *>malloc(max_bytes)
        self.scratch = <uint8_t *>malloc(SCRATCH)
        self.off = <uint32_t *>malloc(max_frames * sizeof(uint32_t))
        self.length = <uint32_t *>malloc(max_frames * sizeof(uint32_t))
        self.hashes = <uint64_t *>malloc(max_frames * sizeof(uint64_t))
        if not (self.buf and self.scratch and self.off and self.length and self.hashes):
            raise MemoryError()
        self.head_idx = self.count = 0
        self.head_byte = self.tail_byte = 0
        self.first = self.next = 0
        self.evicted_through = -1

    def __dealloc__(self):
        free(self.buf)
        free(self.scratch)
        free(self.off)
        free(self.length)
        free(self.hashes)

    # ---- the ring ----------------------------------------------------------------------

    cdef inline size_t _idx(self, uint64_t seq) noexcept nogil:
        return (self.head_idx + <size_t>(seq - self.first)) % self.max_frames

    cdef void _evict_one(self) noexcept:
        cdef size_t i = self.head_idx
        self.bytes_held -= self.length[i]
        self.evicted_through = <int64_t>self.first
        self.evicted += 1
        self.first += 1
        self.count -= 1
        self.head_idx = (i + 1) % self.max_frames
        if self.count:
            self.head_byte = self.off[self.head_idx]
        else:
            self.head_byte = self.tail_byte = 0

    cdef size_t _place(self, size_t n) noexcept:
        """Where a frame of n bytes goes, evicting the oldest until it fits (or
        <size_t>-1 when it can never fit)."""
        if n > self.max_bytes:
            return <size_t>-1
        while True:
            if self.count == self.max_frames:
                self._evict_one()
                continue
            if self.count == 0:
                self.head_byte = self.tail_byte = 0
                return 0
            if self.tail_byte > self.head_byte:
                # data in [head, tail): after it, or wrapped to the start before head
                if self.max_bytes - self.tail_byte >= n:
                    return self.tail_byte
                if self.head_byte >= n:
                    return 0
            elif self.head_byte - self.tail_byte >= n:
                # wrapped: data in [head, end) and [0, tail); free space between
                return self.tail_byte
            self._evict_one()

    cdef void _hole(self) noexcept:
        """A frame the log could not keep: the sequence numbers stay contiguous in the
        ring, so everything before the hole goes too; evicted_through marks the hole."""
        while self.count:
            self._evict_one()
        self.evicted_through = <int64_t>self.next
        self.next += 1
        self.first = self.next
        self.too_big += 1

    cdef int _append(self, const uint8_t *frame, size_t n) except -1:
        cdef size_t at = self._place(n)
        cdef size_t i
        if at == <size_t>-1:
            self._hole()
            return 0
        memcpy(self.buf + at, frame, n)
        i = (self.head_idx + self.count) % self.max_frames
        self.off[i] = <uint32_t>at
        self.length[i] = <uint32_t>n
        self.hashes[i] = fnv1a(frame, n)
        if self.count == 0:
            self.head_byte = at
            self.first = self.next
        self.count += 1
        self.tail_byte = at + n
        self.bytes_held += n
        self.next += 1
        return 0

    # ---- filling -----------------------------------------------------------------------

    def append(self, frame):
        """Log one frame (tests, and frames that arrive by another path)."""
        cdef const uint8_t[::1] mv = frame
        if mv.shape[0] == 0:
            return
        self._append(&mv[0], mv.shape[0])

    def fill(self, int fd):
        """Read every frame waiting on the AF_PACKET socket fd (non-blocking reads) into
        the log; frames this host itself sent on the link are skipped. Returns the number
        logged; raises OSError for a socket error other than EAGAIN."""
        cdef sockaddr_ll sll
        cdef socklen_t alen
        cdef ssize_t r
        cdef int got = 0, reads = 0, e
        while reads < FILL_BUDGET:
            alen = sizeof(sll)
            r = recvfrom(fd, self.scratch, SCRATCH, MSG_DONTWAIT | MSG_TRUNC,
                         <sockaddr *>&sll, &alen)
            if r < 0:
                e = errno
                if e == EINTR:
                    continue
                if e == EAGAIN:
                    break
                raise OSError(e, os.strerror(e))
            reads += 1
            if sll.sll_pkttype == PACKET_OUTGOING:
                self.outgoing += 1
                continue
            if r > SCRATCH:
                self._hole()            # longer than any frame: the log cannot hold it
                continue
            if r == 0:
                continue
            self._append(self.scratch, <size_t>r)
            got += 1
        return got

    @staticmethod
    def socket_drops(int fd):
        """Frames the kernel dropped on the AF_PACKET socket fd since the last call (its
        receive buffer was full: those frames never reached the log)."""
        cdef tpacket_stats st
        cdef socklen_t n = sizeof(st)
        if getsockopt(fd, SOL_PACKET, PACKET_STATISTICS, &st, &n) != 0:
            e = errno
            raise OSError(e, os.strerror(e))
        return st.tp_drops

    # ---- reading ------------------------------------------------------------------------

    @property
    def frames(self):
        return self.count

    def hash_at(self, uint64_t seq):
        if seq < self.first or seq >= self.first + self.count:
            raise IndexError("frame %d is not in the log (%d..%d)"
                             % (seq, self.first, self.first + self.count))
        return self.hashes[self._idx(seq)]

    def find(self, uint64_t h, uint64_t lo, uint64_t hi, uint64_t near):
        """The sequence number of the frame with hash h in [lo, hi) nearest to `near`
        (the earlier one on a tie), or -1."""
        cdef uint64_t a, b, seq
        cdef int64_t best = -1
        cdef uint64_t best_d = 0, d
        a = lo if lo > self.first else self.first
        b = hi if hi < self.first + self.count else self.first + self.count
        seq = a
        while seq < b:
            if self.hashes[self._idx(seq)] == h:
                d = seq - near if seq >= near else near - seq
                if best < 0 or d < best_d:
                    best, best_d = <int64_t>seq, d
            seq += 1
        return best

    def chain(self, uint64_t lo, uint64_t hi, uint64_t start):
        """The chained hash (colocore_ext.virtq.chain_hash) of frames lo..hi inclusive,
        folded onto `start`; None unless all of them are in the log."""
        cdef uint64_t seq, c = start
        if hi < lo:
            return start
        if lo < self.first or hi >= self.first + self.count:
            return None
        for seq in range(lo, hi + 1):
            c = (c ^ self.hashes[self._idx(seq)]) * 1099511628211ULL
        return c

    def drop_through(self, int64_t seq):
        """Forget every frame up to and including sequence number seq."""
        while self.count and <int64_t>self.first <= seq:
            self.bytes_held -= self.length[self.head_idx]
            self.first += 1
            self.count -= 1
            self.head_idx = (self.head_idx + 1) % self.max_frames
            if self.count:
                self.head_byte = self.off[self.head_idx]
            else:
                self.head_byte = self.tail_byte = 0

    def send_from(self, int fd, uint64_t seq):
        """Send frames seq.. (from the oldest kept if seq is older) to the packet socket
        fd, one send each, never blocking; returns the sequence number to send next (a
        frame the socket refused with EAGAIN/ENOBUFS is tried again then, any other
        refusal skips it). A hybrid COLO secondary feeds its guest's tap with it."""
        cdef size_t i
        cdef ssize_t r
        cdef int e
        if seq < self.first:
            seq = self.first
        while seq < self.first + self.count:
            i = self._idx(seq)
            r = send(fd, self.buf + self.off[i], self.length[i], MSG_DONTWAIT)
            if r < 0:
                e = errno
                if e == EINTR:
                    continue
                if e == EAGAIN or e == ENOBUFS:
                    break
            seq += 1
        return seq

    def frames_from(self, uint64_t seq, size_t limit):
        """Up to `limit` frames from sequence number seq on, oldest first (bytes)."""
        cdef list out = []
        cdef size_t i
        if seq < self.first:
            seq = self.first
        while seq < self.first + self.count and <size_t>len(out) < limit:
            i = self._idx(seq)
            out.append((<char *>self.buf)[self.off[i]:self.off[i] + self.length[i]])
            seq += 1
        return out
