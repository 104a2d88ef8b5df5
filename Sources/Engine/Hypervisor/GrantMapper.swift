import Synchronization

/// Maps pages another domain granted us (Xen's GNTTABOP_map_grant_ref through gntdev).
/// The daemon opens one mapper and shares it between all devices and threads.
public protocol GrantMapper: AnyObject, Sendable {
    /// Maps `refs` of `domain`'s grant table into one contiguous range, page i = refs[i].
    /// All or nothing: on any refusal nothing stays mapped and the error names the ref.
    func map(domain: UInt32, refs: [UInt32], writable: Bool) throws -> GrantMapping
    /// Whether a mapping is really gone when unmap returns even after direct I/O used its
    /// pages. Linux gntdev (since 5.19's async unmap) defers the grant unmap while O_DIRECT
    /// still holds page references, so a response sent right after unmap reaches a frontend
    /// whose grant is still in use — blkfront then disables the disk ("backed has not unmapped
    /// grant"). Where this is false, pages not kept mapped are copied by the hypervisor for
    /// direct I/O (GNTTABOP_copy), never unmapped right before an answer.
    var unmapIsSynchronousAfterDirectIO: Bool { get }
    /// GNTTABOP_copy: the hypervisor copies between pages `domain` granted and our memory,
    /// mapping nothing (what QEMU's qdisk does). Every segment is tried; throws naming the
    /// first one refused.
    func copy(domain: UInt32, _ direction: GrantCopyDirection, _ segments: [GrantCopySegment]) throws
}

public enum GrantCopyDirection: Sendable {
    /// Granted pages → our memory (the data of a WRITE).
    case fromGuest
    /// Our memory → granted pages (the data of a READ); the grants must be writable.
    case toGuest
}

/// One GNTTABOP_copy segment: `length` bytes between `local` and the page behind `ref`,
/// starting `offset` bytes into it (offset + length ≤ 4096).
public struct GrantCopySegment {
    public var ref: UInt32
    public var offset: UInt16
    public var length: UInt16
    public var local: UnsafeMutableRawPointer

    public init(ref: UInt32, offset: UInt16, length: UInt16, local: UnsafeMutableRawPointer) {
        self.ref = ref
        self.offset = offset
        self.length = length
        self.local = local
    }
}

/// Granted pages mapped into this process. Owns the mapping: `unmap()` releases it once
/// (later calls do nothing); a mapping dropped without `unmap()` is released by deinit so the
/// grant does not stay pinned forever. A read-only mapping must only be read.
public final class GrantMapping: @unchecked Sendable {
    public static let pageSize = 4096

    public let domain: UInt32
    public let refs: [UInt32]
    public let writable: Bool
    public let base: UnsafeMutableRawPointer
    public var pageCount: Int { refs.count }
    public var bytes: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: base, count: pageCount * GrantMapping.pageSize)
    }

    private let release: Mutex<(@Sendable (UnsafeMutableRawPointer) throws -> Void)?>

    /// For mapper implementations: `release` undoes the mapping at `base` and runs at most once.
    public init(domain: UInt32, refs: [UInt32], writable: Bool, base: UnsafeMutableRawPointer,
                release: @escaping @Sendable (UnsafeMutableRawPointer) throws -> Void) {
        self.domain = domain
        self.refs = refs
        self.writable = writable
        self.base = base
        self.release = Mutex(release)
    }

    /// Address of page `index` of the mapping.
    public func page(_ index: Int) -> UnsafeMutableRawPointer {
        precondition(index >= 0 && index < pageCount, "page index outside the mapping")
        return base + index * GrantMapping.pageSize
    }


    public func unmap() throws {
        let action = release.withLock { slot -> (@Sendable (UnsafeMutableRawPointer) throws -> Void)? in
            defer { slot = nil }
            return slot
        }
        try action?(base)
    }

    deinit { try? unmap() }
}
