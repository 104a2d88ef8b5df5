import Blkif
internal import CURing
import Glibc
import Hypervisor
import Synchronization
import VBDInterface

/// One io_uring instance (liburing), used by one thread: the first one that queues or waits
/// on it. Submissions carry a 64-bit tag that comes back with the completion. The ring is
/// also where that thread sleeps: `watch` turns a descriptor's readiness into completions
/// (multishot poll), so one io_uring_enter both submits and waits for I/O and events alike.
final class IOURing {
    /// What a finished operation returned: bytes moved, 0, or -errno; `more` when a watch
    /// stays armed after this completion.
    struct Completion: Sendable {
        let tag: UInt64
        let result: Int32
        let more: Bool
    }

    private var ring = io_uring()
    let entries: UInt32
    /// Created disabled: enabled by the thread that first uses it (IORING_SETUP_SINGLE_ISSUER).
    private var disabled: Bool

    /// Prefers completions run only when the owning thread waits (DEFER_TASKRUN, Linux 6.1):
    /// an I/O completing wakes nobody but that thread, and only when it asks; TASKRUN_FLAG
    /// makes such held work visible to a polling thread (`hasWork`). Older kernels get
    /// cooperative task running (5.19), then plain rings.
    init(entries: UInt32) throws {
        self.entries = entries
        let preferred: [UInt32] = [
            IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG | IORING_SETUP_R_DISABLED,
            IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
            0,
        ]
        var status: Int32 = -EINVAL
        var chosen: UInt32 = 0
        for flags in preferred {
            var parameters = io_uring_params()
            parameters.flags = flags
            status = io_uring_queue_init_params(entries, &ring, &parameters)
            chosen = flags
            if status != -EINVAL { break }
        }
        if status < 0 { throw SystemCallError(operation: "io_uring_queue_init(\(entries))", errno: -status) }
        disabled = chosen & IORING_SETUP_R_DISABLED != 0
    }

    deinit { io_uring_queue_exit(&ring) }

    /// Fault injection for tests (from any thread): the next `count` io_uring_enter calls
    /// that would submit fail with `errno` instead; the entries stay queued, as after a real
    /// refusal.
    func failSubmissions(_ count: Int, errno: Int32) {
        injectedErrno.store(errno, ordering: .relaxed)
        injectedFailures.store(count, ordering: .releasing)
    }
    private let injectedFailures = Atomic<Int>(0)
    private let injectedErrno = Atomic<Int32>(0)

    private func injectedFailure() -> Int32? {
        guard injectedFailures.load(ordering: .acquiring) > 0, io_uring_sq_ready(&ring) > 0 else { return nil }
        guard injectedFailures.wrappingSubtract(1, ordering: .acquiringAndReleasing).oldValue > 0 else { return nil }
        return injectedErrno.load(ordering: .relaxed)
    }

    /// After io_uring_enter refused to submit: the tags of the entries the kernel did not
    /// take. Each becomes a no-op tagged `ignored`, so that a later io_uring_enter cannot
    /// start I/O for a request that was already answered.
    func withdrawUnsubmitted(replacingTagsWith ignored: UInt64) -> [UInt64] {
        var tags: [UInt64] = []
        let mask = ring.sq.ring_mask
        func withdraw(_ index: UInt32) {
            let entry = ring.sq.sqes + Int(index & mask)
            tags.append(curing_sqe_tag(entry))
            io_uring_prep_nop(entry)
            io_uring_sqe_set_data64(entry, ignored)
        }
        // Handed to the kernel (ktail moved) but not consumed, then not yet handed over.
        var position = ring.sq.khead.pointee
        while position != ring.sq.ktail.pointee {
            withdraw(ring.sq.array[Int(position & mask)])
            position &+= 1
        }
        position = ring.sq.sqe_head
        while position != ring.sq.sqe_tail {
            withdraw(position)
            position &+= 1
        }
        return tags
    }

    /// The calling thread becomes the ring's only submitter.
    private func enableIfNeeded() throws {
        guard disabled else { return }
        let status = curing_enable_rings(&ring)
        if status < 0 { throw SystemCallError(operation: "io_uring_enable_rings", errno: -status) }
        disabled = false
    }

    /// Takes a submission slot, submitting what is queued first when the ring is full.
    private func nextEntry() throws -> UnsafeMutablePointer<io_uring_sqe> {
        try enableIfNeeded()
        if let entry = io_uring_get_sqe(&ring) { return entry }
        try submit()
        guard let entry = io_uring_get_sqe(&ring) else { throw SystemCallError(operation: "io_uring_get_sqe", errno: EBUSY) }
        return entry
    }

    /// Queues a vectored read at `offset`; the iovecs must stay valid until submitted and the
    /// buffers until completion.
    func read(_ descriptor: Int32, _ vectors: UnsafePointer<iovec>, count: Int, offset: UInt64, tag: UInt64) throws {
        let entry = try nextEntry()
        io_uring_prep_readv(entry, descriptor, vectors, UInt32(count), offset)
        io_uring_sqe_set_data64(entry, tag)
    }

    func write(_ descriptor: Int32, _ vectors: UnsafePointer<iovec>, count: Int, offset: UInt64, tag: UInt64) throws {
        let entry = try nextEntry()
        io_uring_prep_writev(entry, descriptor, vectors, UInt32(count), offset)
        io_uring_sqe_set_data64(entry, tag)
    }

    /// fdatasync: what FLUSH_DISKCACHE asks of the backing store.
    func flush(_ descriptor: Int32, tag: UInt64) throws {
        let entry = try nextEntry()
        io_uring_prep_fsync(entry, descriptor, UInt32(IORING_FSYNC_DATASYNC))
        io_uring_sqe_set_data64(entry, tag)
    }

    /// Punches a hole (keeping the size): DISCARD on a regular file.
    func punchHole(_ descriptor: Int32, offset: UInt64, length: UInt64, tag: UInt64) throws {
        let entry = try nextEntry()
        io_uring_prep_fallocate(entry, descriptor, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off_t(offset), off_t(length))
        io_uring_sqe_set_data64(entry, tag)
    }

    /// A completion tagged `tag` each time `descriptor` becomes readable, until one comes
    /// without `more` (then watch again).
    func watch(_ descriptor: Int32, tag: UInt64) throws {
        let entry = try nextEntry()
        io_uring_prep_poll_multishot(entry, descriptor, UInt32(POLLIN))
        io_uring_sqe_set_data64(entry, tag)
    }

    /// One completion tagged `tag` when `descriptor` is ready for what is asked (its result:
    /// the poll events that fired).
    func poll(_ descriptor: Int32, readable: Bool, writable: Bool, tag: UInt64) throws {
        let entry = try nextEntry()
        io_uring_prep_poll_add(entry, descriptor, UInt32((readable ? POLLIN : 0) | (writable ? POLLOUT : 0)))
        io_uring_sqe_set_data64(entry, tag)
    }

    /// Cancels the poll tagged `tag` (it completes with -ECANCELED); the cancellation's own
    /// completion is tagged `reportingAs`.
    func cancelPoll(tag: UInt64, reportingAs ignored: UInt64) throws {
        let entry = try nextEntry()
        io_uring_prep_poll_remove(entry, tag)
        io_uring_sqe_set_data64(entry, ignored)
    }

    /// Hands everything queued to the kernel.
    @discardableResult
    func submit() throws -> Int {
        try enableIfNeeded()
        while true {
            let submitted = io_uring_submit(&ring)
            if submitted >= 0 { return Int(submitted) }
            if submitted == -EINTR { continue }
            throw SystemCallError(operation: "io_uring_submit", errno: -submitted)
        }
    }

    /// Submits what is queued, then waits until at least `minimum` completions are posted or
    /// `milliseconds` pass (nil: no limit); 0 only collects finished work. Whether
    /// completions are waiting.
    @discardableResult
    func submitAndWait(minimum: UInt32, milliseconds: Int? = nil) throws -> Bool {
        try enableIfNeeded()
        if let injected = injectedFailure() { throw SystemCallError(operation: "io_uring_enter (injected)", errno: injected) }
        let status: Int32
        if minimum == 0 {
            status = io_uring_submit_and_get_events(&ring)
        } else if let milliseconds {
            var timeout = __kernel_timespec(tv_sec: Int64(milliseconds / 1000), tv_nsec: Int64(milliseconds % 1000) * 1_000_000)
            var completion: UnsafeMutablePointer<io_uring_cqe>?
            status = io_uring_submit_and_wait_timeout(&ring, &completion, minimum, &timeout, nil)
        } else {
            status = io_uring_submit_and_wait(&ring, minimum)
        }
        // A timeout is not always reported as such (the count of submissions hides it), so
        // what counts is whether completions are there.
        if status < 0 && status != -ETIME && status != -EINTR {
            throw SystemCallError(operation: "io_uring_enter", errno: -status)
        }
        return io_uring_cq_ready(&ring) > 0
    }

    /// Completions are posted, or the kernel holds work that a call to `submitAndWait` would
    /// turn into completions. Reads shared memory only: for polling.
    var hasWork: Bool { curing_has_work(&ring) != 0 }

    /// Calls `body` for each posted completion without blocking; returns how many there were.
    @discardableResult
    func reapCompletions(_ body: (Completion) -> Void) -> Int {
        var count = 0
        var entry: UnsafeMutablePointer<io_uring_cqe>?
        while io_uring_peek_cqe(&ring, &entry) == 0, let completion = entry {
            body(Completion(tag: io_uring_cqe_get_data64(completion), result: completion.pointee.res,
                            more: completion.pointee.flags & IORING_CQE_F_MORE != 0))
            io_uring_cqe_seen(&ring, completion)
            count += 1
        }
        return count
    }
}
