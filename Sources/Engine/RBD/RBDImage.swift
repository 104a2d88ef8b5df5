internal import CRBD
import Glibc
import Synchronization

/// What an image is, as librbd reports it when opened.
public struct RBDImageInfo: Sendable, Equatable {
    public var size: UInt64
    /// Bytes per RADOS object (the image's striping unit).
    public var objectSize: UInt64
    public var hasExclusiveLock: Bool
}

/// One open RBD image on its own cluster connection (librados handle), as QEMU keeps one
/// per drive. librbd is thread-safe: every ring of a VBD issues commands on the same image,
/// so one flush covers the writes of all of them and one exclusive lock guards the image.
public final class RBDImage: @unchecked Sendable {
    public let spec: RBDImageSpec
    public let info: RBDImageInfo
    public let readOnly: Bool
    private let cluster: rados_t
    private let pool: rados_ioctx_t
    private let image: rbd_image_t

    /// Connects to the cluster (giving up after `connectTimeout` seconds) and opens the
    /// image; read-only for a snapshot or when `readOnly`. Operations on the cluster that
    /// wait longer than `operationTimeout` seconds (0: forever) fail with ETIMEDOUT.
    /// A writable image is opened with its exclusive lock taken and kept: another client
    /// asking for it is refused until this one closes the image. A lock still held by
    /// `previousHolder` (the client of a daemon that is gone) is broken first, which also
    /// blocklists that client, rather than waited for until its watch times out (~30 s).
    public init(_ spec: RBDImageSpec, readOnly: Bool, connectTimeout: Double, operationTimeout: Double,
                breakingLockOf previousHolder: String? = nil) throws(RBDError) {
        if spec.snapshot != nil && !readOnly {
            throw RBDError(errno: EROFS, message: "\(spec) is a snapshot, which is read-only; attach it with mode r")
        }
        var cluster: rados_t?
        var status = rados_create(&cluster, spec.user)
        guard status == 0, let cluster else { throw RBDError(returned: status, "creating a Ceph client for \(spec)") }
        func fail(_ value: Int32, _ what: String) -> RBDError {
            rados_shutdown(cluster)
            return RBDError(returned: value, what)
        }
        status = rados_conf_read_file(cluster, spec.configurationFile)
        // No file at all is fine when the options name the monitors (mon_host=...).
        if status < 0, spec.configurationFile != nil || !spec.options.contains(where: { $0.key == "mon_host" }) {
            throw fail(status, "reading the Ceph configuration \(spec.configurationFile ?? "($CEPH_CONF or /etc/ceph/ceph.conf)")")
        }
        status = rados_conf_parse_env(cluster, nil)
        guard status == 0 else { throw fail(status, "reading CEPH_ARGS") }
        let settings = [
            // No client-side cache: librbd's (writearound, or writeback after the first
            // flush) answers writes it holds only in this process, and the daemon can crash
            // while its guest runs on: acknowledged writes would be lost under a live guest.
            RBDImageSpec.Option(key: "rbd_cache", value: "false"),
            RBDImageSpec.Option(key: "client_mount_timeout", value: "\(max(1, Int(connectTimeout.rounded(.up))))"),
            RBDImageSpec.Option(key: "rados_mon_op_timeout", value: "\(Int(operationTimeout.rounded(.up)))"),
            RBDImageSpec.Option(key: "rados_osd_op_timeout", value: "\(Int(operationTimeout.rounded(.up)))"),
        ]
        // Ours last: they hold whatever the target names.
        for option in spec.options + settings {
            status = rados_conf_set(cluster, option.key, option.value)
            guard status == 0 else { throw fail(status, "setting Ceph option \(option.key) for \(spec)") }
        }
        status = rados_connect(cluster)
        guard status == 0 else { throw fail(status, "connecting to the Ceph cluster of \(spec)") }
        var pool: rados_ioctx_t?
        status = rados_ioctx_create(cluster, spec.pool, &pool)
        guard status == 0, let pool else { throw fail(status, "opening pool \(spec.pool)") }
        if let namespace = spec.namespace { rados_ioctx_set_namespace(pool, namespace) }
        var image: rbd_image_t?
        status = readOnly ? rbd_open_read_only(pool, spec.image, &image, spec.snapshot)
            : rbd_open(pool, spec.image, &image, nil)
        guard status == 0, let image else {
            rados_ioctx_destroy(pool)
            throw fail(status, "opening RBD image \(spec)")
        }
        var stat = rbd_image_info_t()
        var features: UInt64 = 0
        status = rbd_stat(image, &stat, MemoryLayout<rbd_image_info_t>.size)
        if status == 0 { status = rbd_get_features(image, &features) }
        guard status == 0 else {
            rbd_close(image)
            rados_ioctx_destroy(pool)
            throw fail(status, "reading the size and features of \(spec)")
        }
        self.spec = spec
        self.readOnly = readOnly
        self.cluster = cluster
        self.pool = pool
        self.image = image
        info = RBDImageInfo(size: stat.size, objectSize: stat.obj_size,
                            hasExclusiveLock: features & UInt64(RBD_FEATURE_EXCLUSIVE_LOCK) != 0)
        // Fully initialized from here: a throw runs deinit, which closes everything.
        if !readOnly { try acquireExclusiveLock(breakingLockOf: previousHolder) }
    }

    deinit {
        // Closing releases the exclusive lock; in-flight commands finish first.
        rbd_close(image)
        rados_ioctx_destroy(pool)
        rados_shutdown(cluster)
    }

    /// Takes the image's exclusive lock for good: librbd hands a lock it took on its own to
    /// any client that asks, which would let two hosts write in turn; one taken explicitly is
    /// refused to others until the image is closed.
    private func acquireExclusiveLock(breakingLockOf previousHolder: String?) throws(RBDError) {
        guard info.hasExclusiveLock else {
            throw RBDError(errno: EINVAL, message: "\(spec) lacks the exclusive-lock feature that keeps a second host from writing it; enable it (rbd feature enable \(spec.pool)/\(spec.image) exclusive-lock) or attach with mode r")
        }
        if let previousHolder, lockOwners() == [previousHolder] {
            let status = rbd_lock_break(image, RBD_LOCK_MODE_EXCLUSIVE, previousHolder)
            guard status == 0 else {
                throw RBDError(returned: status, "breaking the exclusive lock of \(spec) left by \(previousHolder)")
            }
            brokenLock = previousHolder
        }
        let status = rbd_lock_acquire(image, RBD_LOCK_MODE_EXCLUSIVE)
        guard status == 0 else {
            let owners = lockOwners()
            let holder = owners.isEmpty ? "another client" : owners.joined(separator: ", ")
            throw RBDError(errno: EBUSY, message: "\(spec) is in use: its exclusive lock is held by \(holder) (attached writable on another host?); detach it there first (\(String(cString: strerror(Int32(clamping: -status)))))")
        }
        lockHolder = lockOwners().first
    }

    /// This client, as the exclusive lock's holder (nil unless writable).
    public private(set) var lockHolder: String?
    /// The holder whose lock was broken at open, if one was.
    public private(set) var brokenLock: String?

    /// Who holds the exclusive lock now (client addresses), as far as librbd can tell.
    public func lockOwners() -> [String] {
        var mode = RBD_LOCK_MODE_EXCLUSIVE
        var names = [UnsafeMutablePointer<CChar>?](repeating: nil, count: 8)
        var count = names.count
        guard rbd_lock_get_owners(image, &mode, &names, &count) == 0 else { return [] }
        defer { rbd_lock_get_owners_cleanup(&names, count) }
        return names.prefix(count).compactMap { $0.map { String(cString: $0) } }
    }

    /// The image's size now (it may be resized while attached).
    public func currentSize() throws(RBDError) -> UInt64 {
        var size: UInt64 = 0
        let status = rbd_get_size(image, &size)
        guard status == 0 else { throw RBDError(returned: status, "reading the size of \(spec)") }
        return size
    }

    // MARK: asynchronous commands

    /// Reads `count` bytes at `offset` into `buffer` (valid until the command is retired by
    /// `queue`). The command's cookie.
    public func read(into buffer: UnsafeMutableRawPointer, count: Int, offset: UInt64, queue: RBDCompletionQueue) throws(RBDError) -> UInt {
        try issue(queue, "reading \(count) bytes at byte \(offset)") { rbd_aio_read(image, offset, count, buffer, $0) }
    }

    public func write(from buffer: UnsafeRawPointer, count: Int, offset: UInt64, queue: RBDCompletionQueue) throws(RBDError) -> UInt {
        try issue(queue, "writing \(count) bytes at byte \(offset)") { rbd_aio_write(image, offset, count, buffer, $0) }
    }

    public func flush(queue: RBDCompletionQueue) throws(RBDError) -> UInt {
        try issue(queue, "flushing") { rbd_aio_flush(image, $0) }
    }

    public func discard(count: UInt64, offset: UInt64, queue: RBDCompletionQueue) throws(RBDError) -> UInt {
        try issue(queue, "discarding \(count) bytes at byte \(offset)") { rbd_aio_discard(image, offset, count, $0) }
    }

    /// `what` is spelled out only on failure: commands go out per request.
    private func issue(_ queue: RBDCompletionQueue, _ what: @autoclosure () -> String,
                       _ start: (rbd_completion_t) -> Int32) throws(RBDError) -> UInt {
        // The queue stays alive until the callback ran (it releases this reference).
        let argument = Unmanaged.passRetained(queue).toOpaque()
        var completion: rbd_completion_t?
        var status = rbd_aio_create_completion(argument, rbdCommandCompleted, &completion)
        guard status == 0, let completion else {
            Unmanaged<RBDCompletionQueue>.fromOpaque(argument).release()
            throw RBDError(returned: status, what())
        }
        status = start(completion)
        guard status == 0 else {
            rbd_aio_release(completion)
            Unmanaged<RBDCompletionQueue>.fromOpaque(argument).release()
            throw RBDError(returned: status, "\(what()) on \(spec)")
        }
        return UInt(bitPattern: completion)
    }
}

/// librbd's completion callback, on one of its threads.
private let rbdCommandCompleted: rbd_callback_t = { completion, argument in
    guard let completion, let argument else { return }
    Unmanaged<RBDCompletionQueue>.fromOpaque(argument).takeRetainedValue().post(completion)
}

/// Where librbd's completions wait for the thread that issued the commands: its callbacks
/// append here and wake that thread through an eventfd it polls, once per batch.
public final class RBDCompletionQueue: Sendable {
    private let completed = Mutex<[UInt]>([])
    private let wakeup: Int32

    /// `wakeup` is an eventfd the issuing thread polls; it must outlive every command.
    public init(wakeup: Int32) { self.wakeup = wakeup }

    fileprivate func post(_ completion: rbd_completion_t) {
        let first = completed.withLock { list in
            list.append(UInt(bitPattern: completion))
            return list.count == 1
        }
        if first {
            var one: UInt64 = 1
            _ = Glibc.write(wakeup, &one, 8)
        }
    }

    /// Retires every completed command: its cookie and its result (bytes or 0; -errno on
    /// failure).
    public func retire(_ body: (_ cookie: UInt, _ result: Int) -> Void) {
        let batch = completed.withLock { list in
            let batch = list
            list.removeAll(keepingCapacity: true)
            return batch
        }
        for cookie in batch {
            let completion = UnsafeMutableRawPointer(bitPattern: cookie)
            let result = rbd_aio_get_return_value(completion)
            rbd_aio_release(completion)
            body(cookie, result)
        }
    }
}
