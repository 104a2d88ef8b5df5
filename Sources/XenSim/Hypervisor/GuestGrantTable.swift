import Blkif
import Hypervisor
import SimHypervisor
import Synchronization
import Xenbus

/// A guest's side of its grant table, doing what Linux's grant-table.c does for v1 entries.
public final class GuestGrantTable: @unchecked Sendable {
    /// Linux's GNTTAB_NR_RESERVED_ENTRIES: refs below 8 belong to the toolstack.
    public static let reservedEntries: UInt32 = 8

    private let table: SimGrantTable
    private let free: Mutex<[UInt32]>
    public var entryCount: Int { table.entryCount }

    public init(directory: String, domid: UInt32) throws {
        guard SimDomain.exists(directory: directory, domid: domid) else { throw SimDomainError.noSuchDomain(domid) }
        table = try SimGrantTable(path: SimLayout(directory: directory).grantTable(domid))
        free = Mutex(Array((GuestGrantTable.reservedEntries..<UInt32(table.entryCount)).reversed()))
    }

    /// gnttab_grant_foreign_access: lets `domain` map `frame`; returns the grant ref.
    public func grantAccess(frame: UInt32, to domain: UInt32, readOnly: Bool) throws -> UInt32 {
        guard let ref = free.withLock({ $0.popLast() }) else { throw SimDomainError.noFreeGrantRefs }
        let flags = GrantFlags.permitAccess | (readOnly ? GrantFlags.readOnly : 0)
        table.publish(ref, frame: frame, domid: UInt16(truncatingIfNeeded: domain), flags: flags)
        return ref
    }

    /// gnttab_end_foreign_access_ref: revokes the grant unless the backend still maps it
    /// (then throws grantBusy and the grant stays). The cmpxchg to 0 races correctly with
    /// the hypervisor setting GTF_reading.
    public func endForeignAccess(_ ref: UInt32) throws {
        guard ref >= GuestGrantTable.reservedEntries, Int(ref) < table.entryCount,
              table.entry(ref).flags & GrantFlags.typeMask != 0 else {
            throw SimDomainError.invalidGrantRef(ref)
        }
        var flags = table.entry(ref).flags
        while true {
            if flags & (GrantFlags.reading | GrantFlags.writing) != 0 { throw SimDomainError.grantBusy(ref: ref) }
            let found = table.compareExchangeFlags(ref, expected: flags, desired: 0)
            if found == flags { break }
            flags = found
        }
        free.withLock { $0.append(ref) }
    }

    public func entry(_ ref: UInt32) -> GrantEntryV1 { table.entry(ref) }

    /// gnttab_query_foreign_access: whether a backend maps the grant now.
    public func isMappedByBackend(_ ref: UInt32) -> Bool {
        Int(ref) < table.entryCount && table.entry(ref).flags & (GrantFlags.reading | GrantFlags.writing) != 0
    }

    /// Writes an arbitrary entry, as a hostile guest can: for attacks and tests only.
    public func writeRawEntry(_ ref: UInt32, flags: UInt16, domid: UInt16, frame: UInt32) throws {
        guard Int(ref) < table.entryCount else { throw SimDomainError.invalidGrantRef(ref) }
        table.publish(ref, frame: frame, domid: domid, flags: flags)
    }
}

/// A guest's event channels: the same client the backend uses under `--sim`, plus
/// `allocUnbound(remoteDomain:)`, which frontends call.
public typealias GuestEventChannels = SimEventChannels
