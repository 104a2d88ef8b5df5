import CHypervisorShim
import CXenBlkif
import Hypervisor

/// The v1 grant-entry flag bits (xen/grant_table.h), in Xen's names.
public enum GrantFlags {
    public static let permitAccess = UInt16(GTF_permit_access)
    public static let typeMask = UInt16(GTF_type_mask)
    public static let readOnly = UInt16(GTF_readonly)
    public static let reading = UInt16(GTF_reading)
    public static let writing = UInt16(GTF_writing)
}

/// One struct grant_entry_v1 as read from the shared table.
public struct GrantEntryV1: Equatable, Sendable {
    public var flags: UInt16
    public var domid: UInt16
    public var frame: UInt32
}

/// A domain's v1 grant table in the simulator: memory the guest writes and the hypervisor
/// reads and flips flags in, both with atomics, as Xen and Linux do on the real shared page.
/// Layout per entry (struct grant_entry_v1): u16 flags @0, u16 domid @2, u32 frame @4.
public final class SimGrantTable: @unchecked Sendable {
    private let file: SimSharedFile
    public let entryCount: Int

    public init(path: String) throws {
        file = try SimSharedFile(path: path)
        entryCount = file.size / SimLayout.grantEntrySize
    }

    public var inode: UInt64 { file.inode }

    private func entryAddress(_ ref: UInt32) -> UnsafeMutableRawPointer {
        precondition(Int(ref) < entryCount, "grant ref outside the table")
        return file.base + Int(ref) * SimLayout.grantEntrySize
    }
    private func flagsPointer(_ ref: UInt32) -> UnsafeMutablePointer<UInt16> {
        entryAddress(ref).assumingMemoryBound(to: UInt16.self)
    }
    private func domidPointer(_ ref: UInt32) -> UnsafeMutablePointer<UInt16> {
        (entryAddress(ref) + 2).assumingMemoryBound(to: UInt16.self)
    }
    private func framePointer(_ ref: UInt32) -> UnsafeMutablePointer<UInt32> {
        (entryAddress(ref) + 4).assumingMemoryBound(to: UInt32.self)
    }
    /// flags and domid as one little-endian word, the unit Xen's _set_status_v1 cmpxchg's.
    private func headerPointer(_ ref: UInt32) -> UnsafeMutablePointer<UInt32> {
        entryAddress(ref).assumingMemoryBound(to: UInt32.self)
    }

    public func entry(_ ref: UInt32) -> GrantEntryV1 {
        GrantEntryV1(flags: hv_load16(flagsPointer(ref)), domid: hv_load16(domidPointer(ref)),
                     frame: hv_load32(framePointer(ref)))
    }

    /// flags | domid << 16, read atomically.
    public func header(_ ref: UInt32) -> UInt32 { hv_load32(headerPointer(ref)) }

    /// Returns the header found; the swap happened iff it equals `expected`.
    public func compareExchangeHeader(_ ref: UInt32, expected: UInt32, desired: UInt32) -> UInt32 {
        hv_cmpxchg32(headerPointer(ref), expected, desired)
    }

    /// Returns the flags found; the swap happened iff they equal `expected`.
    public func compareExchangeFlags(_ ref: UInt32, expected: UInt16, desired: UInt16) -> UInt16 {
        hv_cmpxchg16(flagsPointer(ref), expected, desired)
    }

    /// Xen's gnttab_clear_flags.
    public func clearFlags(_ ref: UInt32, _ bits: UInt16) { hv_clear_bits16(flagsPointer(ref), bits) }

    /// Linux's gnttab_grant_foreign_access_ref: frame and domid first, a write barrier, then
    /// the flags that make the entry valid, so the hypervisor never sees a half-written grant.
    public func publish(_ ref: UInt32, frame: UInt32, domid: UInt16, flags: UInt16) {
        hv_store32_relaxed(framePointer(ref), frame)
        hv_store16_relaxed(domidPointer(ref), domid)
        hv_wmb()
        hv_store16_release(flagsPointer(ref), flags)
    }
}
