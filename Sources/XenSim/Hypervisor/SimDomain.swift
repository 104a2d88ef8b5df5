import Blkif
import Glibc
import Hypervisor
import SimHypervisor
import Xenbus

/// A failed guest-side simulator operation, one line for the user.
public enum SimDomainError: Error, CustomStringConvertible, Sendable, Equatable {
    case invalidDomid(UInt32)
    case invalidMemory(megabytes: Int)
    case domainExists(UInt32)
    case noSuchDomain(UInt32)
    case io(path: String, errno: Int32)
    /// endForeignAccess while the backend still maps the page (GTF_reading/GTF_writing set).
    case grantBusy(ref: UInt32)
    case invalidGrantRef(UInt32)
    case noFreeGrantRefs
    case outOfMemory(pages: Int)

    public var description: String {
        switch self {
        case let .invalidDomid(d): return "domid \(d) is not a guest domid (use 1...32751)"
        case let .invalidMemory(mb): return "memory \(mb) MiB is out of range (use 1...1048576)"
        case let .domainExists(d): return "domain \(d) already exists; destroy it first"
        case let .noSuchDomain(d): return "domain \(d) does not exist; create it with `xensim domain create`"
        case let .io(path, e): return "\(path): \(String(cString: strerror(e)))"
        case let .grantBusy(ref): return "grant ref \(ref) is still mapped by the backend (GTF_reading/GTF_writing set)"
        case let .invalidGrantRef(ref): return "grant ref \(ref) is not one this guest granted"
        case .noFreeGrantRefs: return "the grant table is full; end foreign access to some grants first"
        case let .outOfMemory(pages): return "guest memory has no \(pages) free page(s)"
        }
    }
}

/// Creating and destroying a simulated domain's hypervisor state: its memory file (all RAM,
/// sparse), its grant table and the hypervisor-private pin counts (see SimLayout).
public enum SimDomain {
    /// Creates DIR/domains/<domid>/ complete or not at all (built aside, then renamed in).
    public static func createDomain(directory: String, domid: UInt32, memoryMB: Int) throws {
        guard domid >= 1, DomainID(rawValue: domid) != nil else { throw SimDomainError.invalidDomid(domid) }
        guard memoryMB >= 1 && memoryMB <= 1 << 20 else { throw SimDomainError.invalidMemory(megabytes: memoryMB) }
        let layout = SimLayout(directory: directory)
        try makeDirectory(directory)
        try makeDirectory(layout.domainsDirectory)
        let final = layout.domainDirectory(domid)
        if access(final, F_OK) == 0 { throw SimDomainError.domainExists(domid) }
        let staging = "\(layout.domainsDirectory)/.\(domid).creating.\(getpid())"
        try makeDirectory(staging)
        do {
            try createFile("\(staging)/memory", size: memoryMB << 20)
            try createFile("\(staging)/grant-table", size: SimLayout.grantEntries * SimLayout.grantEntrySize)
            try createFile("\(staging)/grant-active", size: SimGrantActiveTable.fileSize(entries: SimLayout.grantEntries))
            do {
                try SimGrantActiveTable.initialize(path: "\(staging)/grant-active", entries: SimLayout.grantEntries)
            } catch HypervisorError.simulatorUnavailable(let path, let errno) {
                throw SimDomainError.io(path: path, errno: errno)
            }
            guard rename(staging, final) == 0 else {
                let error = Glibc.errno
                throw error == EEXIST || error == ENOTEMPTY ? SimDomainError.domainExists(domid)
                    : SimDomainError.io(path: final, errno: error)
            }
        } catch {
            removeTree(staging)
            throw error
        }
    }

    /// Removes the domain's state, marked dying first. Processes that still map its pages keep them until they
    /// unmap (the files live on while mapped), as Xen keeps a dying domain's granted pages.
    public static func destroyDomain(directory: String, domid: UInt32) throws {
        let layout = SimLayout(directory: directory)
        let dir = layout.domainDirectory(domid)
        let doomed = "\(layout.domainsDirectory)/.\(domid).destroying.\(getpid())"
        guard rename(dir, doomed) == 0 else {
            let error = Glibc.errno
            throw error == ENOENT ? SimDomainError.noSuchDomain(domid) : SimDomainError.io(path: dir, errno: error)
        }
        // Xen's d->is_dying: processes that cache the domain's files look for it, not at
        // the directory, before each grant operation.
        (try? SimGrantActiveTable(path: "\(doomed)/grant-active", entries: SimLayout.grantEntries))?.markDying()
        removeTree(doomed)
    }

    public static func exists(directory: String, domid: UInt32) -> Bool {
        access(SimLayout(directory: directory).grantTable(domid), F_OK) == 0
    }

    /// Domids with state under DIR/domains, ascending.
    public static func list(directory: String) -> [UInt32] {
        SimLayout.directoryEntries(SimLayout(directory: directory).domainsDirectory)
            .compactMap { name in UInt32(name).flatMap { String($0) == name ? $0 : nil } }.sorted()
    }

    private static func makeDirectory(_ path: String) throws {
        guard mkdir(path, 0o755) == 0 || Glibc.errno == EEXIST else {
            throw SimDomainError.io(path: path, errno: Glibc.errno)
        }
    }

    private static func createFile(_ path: String, size: Int) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SimDomainError.io(path: path, errno: Glibc.errno) }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else { throw SimDomainError.io(path: path, errno: Glibc.errno) }
    }

    /// The domain's files, and the pin ledgers of processes that mapped its grants.
    private static func removeTree(_ dir: String) {
        for name in SimLayout.directoryEntries(dir) { unlink("\(dir)/\(name)") }
        rmdir(dir)
    }
}
