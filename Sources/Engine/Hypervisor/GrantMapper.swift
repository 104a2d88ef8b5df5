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
    /// grant"). Where this is false, guest I/O goes through the page cache.
    var unmapIsSynchronousAfterDirectIO: Bool { get }
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
