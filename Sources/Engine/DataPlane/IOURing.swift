import Blkif
internal import CURing
import Glibc
import Hypervisor
import VBDInterface

/// One io_uring instance (liburing) for one worker thread. Submissions carry a 64-bit tag
/// that comes back with the completion; completions also signal an eventfd, so the worker
/// can poll the ring together with its event channel.
final class IOURing {
    /// What a finished operation returned: bytes moved, 0, or -errno.
    struct Completion: Sendable {
        let tag: UInt64
        let result: Int32
    }

    private var ring = io_uring()
    /// Readable whenever completions were posted since the last `drainSignal()`.
    let completionDescriptor: Int32
    let entries: UInt32

    init(entries: UInt32) throws {
        self.entries = entries
        let status = io_uring_queue_init(entries, &ring, 0)
        if status < 0 { throw SystemCallError(operation: "io_uring_queue_init(\(entries))", errno: -status) }
        let descriptor = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        if descriptor < 0 {
            let error = errno
            io_uring_queue_exit(&ring)
            throw SystemCallError(operation: "eventfd", errno: error)
        }
        let registered = io_uring_register_eventfd(&ring, descriptor)
        if registered < 0 {
            close(descriptor)
            io_uring_queue_exit(&ring)
            throw SystemCallError(operation: "io_uring_register_eventfd", errno: -registered)
        }
        completionDescriptor = descriptor
    }

    deinit {
        io_uring_queue_exit(&ring)
        close(completionDescriptor)
    }

    /// Takes a submission slot, submitting what is queued first when the ring is full.
    private func nextEntry() throws -> UnsafeMutablePointer<io_uring_sqe> {
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

    /// Hands everything queued to the kernel.
    @discardableResult
    func submit() throws -> Int {
        while true {
            let submitted = io_uring_submit(&ring)
            if submitted >= 0 { return Int(submitted) }
            if submitted == -EINTR { continue }
            throw SystemCallError(operation: "io_uring_submit", errno: -submitted)
        }
    }

    /// Calls `body` for each posted completion without blocking; returns how many there were.
    @discardableResult
    func reapCompletions(_ body: (Completion) -> Void) -> Int {
        var count = 0
        var entry: UnsafeMutablePointer<io_uring_cqe>?
        while io_uring_peek_cqe(&ring, &entry) == 0, let completion = entry {
            body(Completion(tag: io_uring_cqe_get_data64(completion), result: completion.pointee.res))
            io_uring_cqe_seen(&ring, completion)
            count += 1
        }
        return count
    }

    /// Clears the eventfd's count; call before reaping so no completion is missed.
    func drainSignal() {
        var value: UInt64 = 0
        _ = Glibc.read(completionDescriptor, &value, 8)
    }
}
