import CHypervisorShim
import Glibc
import Hypervisor

/// DIR/domains/<N>/grant-active: the hypervisor-private half of a guest's grant table, which
/// the guest never maps. Per ref, the pins Xen keeps in its active entries; after them, one
/// page of per-domain state:
///
///     +0    u32 dying: set once `xensim domain destroy` begins (Xen's d->is_dying)
///     +64   the domain's grant-table lock: a pthread mutex, process-shared and robust
///
/// The lock is Xen's per-domain grant-table lock. Every process that maps or copies grants
/// takes it around the pin counts; uncontended it costs two atomics, where the flock it
/// replaced cost two system calls per grant operation.
public final class SimGrantActiveTable: @unchecked Sendable {
    /// Per ref: u32 read-only pins, u32 writable pins, u32 frame, u16 mapping domid.
    static let entrySize = 16
    private static let lockOffset = 64

    /// The file's size for a grant table of `entries`.
    public static func fileSize(entries: Int) -> Int { entries * entrySize + SimLayout.pageSize }

    /// Sets up the lock of a new, zero-filled grant-active file (domain creation).
    public static func initialize(path: String, entries: Int) throws {
        let table = try SimGrantActiveTable(path: path, entries: entries)
        let result = hv_shared_lock_init(table.lockPointer)
        guard result == 0 else { throw HypervisorError.simulatorUnavailable(path: path, errno: result) }
    }

    private let file: SimSharedFile
    private let entries: Int

    public convenience init(directory: String, domain: UInt32) throws {
        try self.init(path: SimLayout(directory: directory).grantActive(domain), entries: SimLayout.grantEntries)
    }

    public init(path: String, entries: Int) throws {
        file = try SimSharedFile(path: path)
        self.entries = entries
        guard file.size >= Self.fileSize(entries: entries), hv_shared_lock_size() <= SimLayout.pageSize - Self.lockOffset else {
            throw HypervisorError.simulatorUnavailable(path: path, errno: EINVAL)
        }
    }

    func entry(_ ref: UInt32) -> UnsafeMutableRawPointer { file.base + Int(ref) * Self.entrySize }

    private var state: UnsafeMutableRawPointer { file.base + entries * Self.entrySize }
    private var dyingPointer: UnsafeMutablePointer<UInt32> { state.assumingMemoryBound(to: UInt32.self) }
    private var lockPointer: UnsafeMutableRawPointer { state + Self.lockOffset }

    /// Whether the domain's destruction has begun: its grants are refused from then on.
    public var isDying: Bool { hv_load32(dyingPointer) != 0 }

    public func markDying() { hv_store32_release(dyingPointer, 1) }

    /// Takes the domain's grant-table lock (waiting for it), on behalf of the calling thread.
    public func lock() throws {
        let result = hv_shared_lock(lockPointer)
        guard result == 0 else { throw HypervisorError.simulatorUnavailable(path: file.path, errno: result) }
    }

    /// Releases the lock; only the thread that took it may.
    public func unlock() { hv_shared_unlock(lockPointer) }
}
