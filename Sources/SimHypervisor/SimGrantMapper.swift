import Glibc
import Hypervisor
import Synchronization

/// Grant mapping against the simulator's files, following Xen's __gnttab_map_grant_ref /
/// __gnttab_unmap_common: validate the guest's entry, pin it with a cmpxchg on the shared
/// flags (GTF_reading, GTF_writing), count pins in hypervisor-private state, and map the very
/// pages of the guest's memory file, so both processes share the bytes.
public final class SimGrantMapper: GrantMapper, @unchecked Sendable {
    public var unmapIsSynchronousAfterDirectIO: Bool { true }
    private let layout: SimLayout
    private let localDomain: UInt32
    /// Each domain's open state and the second its directory was last looked at.
    private let domains = Mutex<[UInt32: (state: SimGrantDomain, checked: Int)]>([:])

    /// `localDomain` is the domid the guest must have granted to (the backend's, normally 0).
    public init(directory: String, localDomain: UInt32 = 0) {
        layout = SimLayout(directory: directory)
        self.localDomain = localDomain
    }

    public func map(domain: UInt32, refs: [UInt32], writable: Bool) throws -> GrantMapping {
        guard let first = refs.first else {
            throw HypervisorError.grantRefused(domain: domain, ref: 0, reason: "no grant refs given")
        }
        let target: SimGrantDomain
        do {
            target = try domainState(domain)
        } catch let error as HypervisorError {
            throw HypervisorError.grantRefused(domain: domain, ref: first, reason: "no such domain (\(error))")
        }
        let base = try target.map(refs: refs, writable: writable, by: UInt16(truncatingIfNeeded: localDomain))
        return GrantMapping(domain: domain, refs: refs, writable: writable, base: base) { base in
            try target.unmap(base: base, refs: refs, writable: writable)
        }
    }

    public func copy(domain: UInt32, _ direction: GrantCopyDirection, _ segments: [GrantCopySegment]) throws {
        guard let first = segments.first else { return }
        let target: SimGrantDomain
        do {
            target = try domainState(domain)
        } catch let error as HypervisorError {
            throw HypervisorError.grantCopyRefused(domain: domain, ref: first.ref, reason: "no such domain (\(error))")
        }
        try target.copy(direction, segments, by: UInt16(truncatingIfNeeded: localDomain))
    }

    /// What Xen does when a process holding grant mappings dies (its gntdev handle closes):
    /// the pins recorded in the ledgers of processes no longer alive are released, so the
    /// guest can take those grants back. Run by the simulated hypervisor (`xensim run`).
    public static func releasePinsOfDeadProcesses(directory: String) {
        let layout = SimLayout(directory: directory)
        for domid in SimLayout.directoryEntries(layout.domainsDirectory).compactMap(UInt32.init) {
            let dir = layout.domainDirectory(domid)
            let ledgers = SimLayout.directoryEntries(dir).filter { $0.hasPrefix(SimGrantDomain.ledgerPrefix) }
            guard !ledgers.isEmpty, let domain = try? SimGrantDomain(layout: layout, domain: domid, directoryInode: 0,
                                                                     keepsLedger: false) else { continue }
            for name in ledgers { domain.releaseLedger(at: "\(dir)/\(name)") }
        }
    }

    /// The open files of `domain`, reopened when the domain was destroyed and created again
    /// (its directory is a new inode then). The directory is looked at only when the domain
    /// is marked dying, and once a second besides (a simulator directory wiped by hand), so a
    /// grant operation costs no system call of its own.
    private func domainState(_ domain: UInt32) throws -> SimGrantDomain {
        let now = SimGrantMapper.monotonicSeconds()
        if let cached = domains.withLock({ $0[domain] }), !cached.state.isDying, now == cached.checked {
            return cached.state
        }
        let dir = layout.domainDirectory(domain)
        var info = stat()
        guard stat(dir, &info) == 0 else { throw HypervisorError.simulatorUnavailable(path: dir, errno: Glibc.errno) }
        if let cached = domains.withLock({ $0[domain] }), cached.state.directoryInode == UInt64(info.st_ino) {
            guard !cached.state.isDying else { throw HypervisorError.simulatorUnavailable(path: dir, errno: ESRCH) }
            domains.withLock { $0[domain]?.checked = now }
            return cached.state
        }
        let fresh = try SimGrantDomain(layout: layout, domain: domain, directoryInode: UInt64(info.st_ino))
        domains.withLock { $0[domain] = (fresh, now) }
        return fresh
    }

    private static func monotonicSeconds() -> Int {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC_COARSE, &now)
        return now.tv_sec
    }
}

/// One guest's grant state as the simulated hypervisor sees it.
///
/// Each process that maps also keeps a ledger, DIR/domains/<N>/pins.<pid>.<n>, of the pins it
/// holds per ref, flock'ed while the process lives: when it dies without unmapping, the
/// hypervisor (`releasePinsOfDeadProcesses`) finds the lock free and releases those pins.
final class SimGrantDomain: @unchecked Sendable {
    static let ledgerPrefix = "pins."
    /// Per ref in a ledger: u32 read-only pins, u32 writable pins.
    static let ledgerEntrySize = 8
    private static let ledgerCount = Atomic<Int>(0)

    /// Xen keeps pin counts in 8-bit fields per kind and fails GNTST_general_error on overflow.
    static let maxPins: UInt32 = 0xFFFF

    let domain: UInt32
    let directoryInode: UInt64
    private let table: SimGrantTable
    private let active: SimGrantActiveTable
    private let memory: Int32
    private let pageCount: UInt32
    /// The whole guest memory, mapped at the first grant copy: a copy is then a memcpy per
    /// segment, as GNTTABOP_copy is one hypercall for a batch, not a system call per page.
    private var copyWindow: UnsafeMutableRawPointer?
    private let ledger: SimSharedFile?

    init(layout: SimLayout, domain: UInt32, directoryInode: UInt64, keepsLedger: Bool = true) throws {
        self.domain = domain
        self.directoryInode = directoryInode
        table = try SimGrantTable(path: layout.grantTable(domain))
        active = try SimGrantActiveTable(path: layout.grantActive(domain), entries: table.entryCount)
        if keepsLedger {
            let number = SimGrantDomain.ledgerCount.add(1, ordering: .relaxed).newValue
            let path = "\(layout.domainDirectory(domain))/\(SimGrantDomain.ledgerPrefix)\(getpid()).\(number)"
            let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            guard fd >= 0, ftruncate(fd, off_t(table.entryCount * SimGrantDomain.ledgerEntrySize)) == 0 else {
                let error = Glibc.errno
                if fd >= 0 { close(fd); unlink(path) }
                throw HypervisorError.simulatorUnavailable(path: path, errno: error)
            }
            close(fd)
            ledger = try SimSharedFile(path: path)
            // Held until this process closes the file: by deinit, or by dying.
            flock(ledger!.descriptor, LOCK_EX)
        } else {
            ledger = nil
        }
        let path = layout.memory(domain)
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw HypervisorError.simulatorUnavailable(path: path, errno: Glibc.errno) }
        var info = stat()
        fstat(fd, &info)
        memory = fd
        pageCount = UInt32(clamping: Int(info.st_size) / SimLayout.pageSize)
    }

    /// Every mapping of ours is gone by now (each holds this object): the ledger is empty.
    deinit {
        if let copyWindow { munmap(copyWindow, Int(pageCount) * SimLayout.pageSize) }
        close(memory)
        if let ledger { unlink(ledger.path) }
    }

    /// Releases the pins of the ledger at `path` if its process is gone, then removes it.
    func releaseLedger(at path: String) {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return }
        defer { close(fd) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0, let dead = try? SimSharedFile(path: path) else { return }
        // A ledger whose pins could not be released stays, for the next sweep.
        do {
            try locked {
                for ref in 0..<UInt32(min(table.entryCount, dead.size / SimGrantDomain.ledgerEntrySize)) {
                    let entry = dead.base + Int(ref) * SimGrantDomain.ledgerEntrySize
                    for _ in 0..<entry.load(as: UInt32.self) { unpin(ref, writable: false) }
                    for _ in 0..<entry.load(fromByteOffset: 4, as: UInt32.self) { unpin(ref, writable: true) }
                }
            }
        } catch {
            return
        }
        unlink(path)
    }

    /// The ledger's count of `ref`'s pins of one kind, changed by `delta`.
    private func record(_ ref: UInt32, writable: Bool, _ delta: Int32) {
        guard let ledger else { return }
        let slot = (ledger.base + Int(ref) * SimGrantDomain.ledgerEntrySize + (writable ? 4 : 0)).assumingMemoryBound(to: UInt32.self)
        slot.pointee = UInt32(bitPattern: Int32(bitPattern: slot.pointee) &+ delta)
    }

    private struct Active {
        var readOnlyPins: UInt32
        var writablePins: UInt32
        var frame: UInt32
        var mapper: UInt16
        var pins: UInt32 { readOnlyPins + writablePins }
    }

    private func loadActive(_ ref: UInt32) -> Active {
        let p = active.entry(ref)
        return Active(readOnlyPins: p.load(as: UInt32.self), writablePins: p.load(fromByteOffset: 4, as: UInt32.self),
                      frame: p.load(fromByteOffset: 8, as: UInt32.self), mapper: p.load(fromByteOffset: 12, as: UInt16.self))
    }
    private func storeActive(_ ref: UInt32, _ a: Active) {
        let p = active.entry(ref)
        p.storeBytes(of: a.readOnlyPins, as: UInt32.self)
        p.storeBytes(of: a.writablePins, toByteOffset: 4, as: UInt32.self)
        p.storeBytes(of: a.frame, toByteOffset: 8, as: UInt32.self)
        p.storeBytes(of: a.mapper, toByteOffset: 12, as: UInt16.self)
    }

    /// Runs `body` holding the domain's grant-table lock, against our threads and other processes.
    private func locked<T>(_ body: () throws -> T) throws -> T {
        try active.lock()
        defer { active.unlock() }
        return try body()
    }

    var isDying: Bool { active.isDying }

    private func refused(_ ref: UInt32, _ reason: String) -> HypervisorError {
        .grantRefused(domain: domain, ref: ref, reason: reason)
    }

    /// Maps all refs into one reserved range or throws having undone every pin and mapping.
    func map(refs: [UInt32], writable: Bool, by mapper: UInt16) throws -> UnsafeMutableRawPointer {
        try locked {
            var frames: [UInt32] = []
            frames.reserveCapacity(refs.count)
            do {
                for ref in refs { frames.append(try pin(ref, writable: writable, by: mapper)) }
                return try mapFrames(frames, writable: writable, firstRef: refs[0])
            } catch {
                for ref in refs.prefix(frames.count).reversed() { unpin(ref, writable: writable) }
                throw error
            }
        }
    }

    /// Xen's gnttab_copy: each segment's grant is acquired like a mapping (its flags say it
    /// is in use meanwhile), the bytes copied through the guest's memory file, and released.
    func copy(_ direction: GrantCopyDirection, _ segments: [GrantCopySegment], by mapper: UInt16) throws {
        let toGuest = direction == .toGuest
        try locked {
            if copyWindow == nil {
                let base = mmap(nil, Int(pageCount) * SimLayout.pageSize, PROT_READ | PROT_WRITE, MAP_SHARED, memory, 0)
                guard let base, base != MAP_FAILED else {
                    throw HypervisorError.grantCopyRefused(domain: domain, ref: segments.first?.ref ?? 0,
                                                           reason: "mapping guest memory: \(HypervisorError.text(Glibc.errno))")
                }
                copyWindow = base
            }
            for segment in segments {
                let length = Int(segment.length)
                guard Int(segment.offset) + length <= SimLayout.pageSize else {
                    throw HypervisorError.grantCopyRefused(domain: domain, ref: segment.ref,
                                                           reason: "\(length) bytes at offset \(segment.offset) cross the page")
                }
                let frame: UInt32
                do {
                    frame = try pin(segment.ref, writable: toGuest, by: mapper)
                } catch HypervisorError.grantRefused(_, let ref, let reason) {
                    throw HypervisorError.grantCopyRefused(domain: domain, ref: ref, reason: reason)
                }
                defer { unpin(segment.ref, writable: toGuest) }
                // pin() checked the frame against the memory's size.
                let guestBytes = copyWindow! + Int(frame) * SimLayout.pageSize + Int(segment.offset)
                if toGuest {
                    guestBytes.copyMemory(from: segment.local, byteCount: length)
                } else {
                    segment.local.copyMemory(from: guestBytes, byteCount: length)
                }
            }
        }
    }

    func unmap(base: UnsafeMutableRawPointer, refs: [UInt32], writable: Bool) throws {
        // Pages go first so the guest can never reclaim a page we still map.
        guard munmap(base, refs.count * SimLayout.pageSize) == 0 else {
            throw HypervisorError.grantUnmapFailed(domain: domain, pages: refs.count, errno: Glibc.errno)
        }
        try locked { for ref in refs { unpin(ref, writable: writable) } }
    }

    /// Xen's map path for one ref: returns the frame to map.
    private func pin(_ ref: UInt32, writable: Bool, by mapper: UInt16) throws -> UInt32 {
        guard Int(ref) < table.entryCount else {
            throw refused(ref, "ref out of range (grant table has \(table.entryCount) entries)")
        }
        var act = loadActive(ref)
        guard act.readOnlyPins < SimGrantDomain.maxPins, act.writablePins < SimGrantDomain.maxPins else {
            throw refused(ref, "pin count overflow")
        }
        let firstPin = act.pins == 0
        if firstPin || (writable && act.writablePins == 0) {
            try setStatus(ref, writable: writable, by: mapper)
            if firstPin {
                act.frame = table.entry(ref).frame
                act.mapper = mapper
            }
        } else if act.mapper != mapper {
            throw refused(ref, "entry is mapped by domain \(act.mapper)")
        }
        guard act.frame < pageCount else {
            // Undo exactly what this attempt set, like Xen's unlock_out_clear path.
            if firstPin { table.clearFlags(ref, GrantFlags.reading | GrantFlags.writing) }
            else if writable && act.writablePins == 0 { table.clearFlags(ref, GrantFlags.writing) }
            throw refused(ref, "frame \(act.frame) out of range (domain has \(pageCount) pages)")
        }
        if writable { act.writablePins += 1 } else { act.readOnlyPins += 1 }
        storeActive(ref, act)
        record(ref, writable: writable, 1)
        return act.frame
    }

    /// Xen's _set_status_v1: check type and domid and set GTF_reading (+GTF_writing) in one
    /// cmpxchg over flags+domid, retrying a few times if the guest keeps changing the entry.
    private func setStatus(_ ref: UInt32, writable: Bool, by mapper: UInt16) throws {
        var found = table.header(ref)
        for _ in 0..<4 {
            let flags = UInt16(truncatingIfNeeded: found)
            let grantee = UInt16(truncatingIfNeeded: found >> 16)
            guard flags & GrantFlags.typeMask == GrantFlags.permitAccess else {
                throw refused(ref, "entry is not GTF_permit_access (flags 0x\(String(flags, radix: 16)))")
            }
            guard grantee == mapper else {
                throw refused(ref, "entry grants domain \(grantee), not domain \(mapper)")
            }
            var newFlags = flags | GrantFlags.reading
            if writable {
                guard flags & GrantFlags.readOnly == 0 else {
                    throw refused(ref, "entry is GTF_readonly; it cannot be mapped writable")
                }
                newFlags |= GrantFlags.writing
            }
            let desired = (found & 0xFFFF_0000) | UInt32(newFlags)
            let previous = table.compareExchangeHeader(ref, expected: found, desired: desired)
            if previous == found { return }
            found = previous
        }
        throw refused(ref, "entry is unstable (the guest keeps changing it)")
    }

    /// Xen's unmap: writable pins gone → clear GTF_writing; all pins gone → clear GTF_reading.
    private func unpin(_ ref: UInt32, writable: Bool) {
        var act = loadActive(ref)
        // A ledger of a dead process never holds more than the table counted.
        guard (writable ? act.writablePins : act.readOnlyPins) > 0 else { return }
        record(ref, writable: writable, -1)
        if writable { act.writablePins -= 1 } else { act.readOnlyPins -= 1 }
        if act.writablePins == 0 { table.clearFlags(ref, GrantFlags.writing) }
        if act.pins == 0 { table.clearFlags(ref, GrantFlags.reading) }
        storeActive(ref, act)
    }

    /// Reserves the range, then maps each run of consecutive frames over it with MAP_FIXED.
    private func mapFrames(_ frames: [UInt32], writable: Bool, firstRef: UInt32) throws -> UnsafeMutableRawPointer {
        let page = SimLayout.pageSize
        let length = frames.count * page
        guard let reserved = mmap(nil, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              reserved != MAP_FAILED else {
            throw refused(firstRef, "cannot reserve \(frames.count) pages: \(HypervisorError.text(Glibc.errno))")
        }
        let prot = writable ? PROT_READ | PROT_WRITE : PROT_READ
        var index = 0
        while index < frames.count {
            var run = 1
            while index + run < frames.count && frames[index + run] == frames[index] + UInt32(run) { run += 1 }
            let placed = mmap(reserved + index * page, run * page, prot, MAP_SHARED | MAP_FIXED,
                              memory, off_t(frames[index]) * off_t(page))
            guard placed != MAP_FAILED else {
                let error = Glibc.errno
                munmap(reserved, length)
                throw refused(firstRef, "cannot map frame \(frames[index]): \(HypervisorError.text(error))")
            }
            index += run
        }
        return reserved
    }
}
