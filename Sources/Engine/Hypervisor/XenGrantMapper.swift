import CXenGnttab
import Glibc

/// Grant mapping on real Xen through libxengnttab (/dev/xen/gntdev).
public final class XenGrantMapper: GrantMapper, @unchecked Sendable {
    public var unmapIsSynchronousAfterDirectIO: Bool { false }
    private let handle: OpaquePointer

    /// Opens gntdev. `maxGrants` raises gntdev's per-handle limit (xengnttab_set_max_grants),
    /// which must happen before the first mapping.
    public init(maxGrants: UInt32? = nil) throws {
        guard let handle = xengnttab_open(nil, 0) else {
            throw HypervisorError.deviceUnavailable(device: "/dev/xen/gntdev", errno: Glibc.errno, module: "xen-gntdev")
        }
        if let maxGrants, xengnttab_set_max_grants(handle, maxGrants) != 0 {
            let error = Glibc.errno
            xengnttab_close(handle)
            throw HypervisorError.deviceUnavailable(device: "/dev/xen/gntdev (limit \(maxGrants) grants)",
                                                    errno: error, module: "xen-gntdev")
        }
        self.handle = handle
    }

    deinit { xengnttab_close(handle) }

    public func copy(domain: UInt32, _ direction: GrantCopyDirection, _ segments: [GrantCopySegment]) throws {
        guard !segments.isEmpty else { return }
        try withUnsafeTemporaryAllocation(of: xengnttab_grant_copy_segment_t.self, capacity: segments.count) { operations in
            for (index, segment) in segments.enumerated() {
                var operation = xengnttab_grant_copy_segment_t()
                let foreign = xengnttab_copy_ptr(foreign: .init(ref: segment.ref, offset: segment.offset,
                                                                domid: UInt16(truncatingIfNeeded: domain)))
                let local = xengnttab_copy_ptr(virt: segment.local)
                switch direction {
                case .fromGuest:
                    (operation.source, operation.dest, operation.flags) = (foreign, local, UInt16(BLKBACK_GNTCOPY_SOURCE_GREF))
                case .toGuest:
                    (operation.source, operation.dest, operation.flags) = (local, foreign, UInt16(BLKBACK_GNTCOPY_DEST_GREF))
                }
                operation.len = segment.length
                (operations.baseAddress! + index).initialize(to: operation)
            }
            guard xengnttab_grant_copy(handle, UInt32(segments.count), operations.baseAddress) == 0 else {
                throw HypervisorError.grantCopyRefused(domain: domain, ref: segments[0].ref,
                                                       reason: "\(segments.count) segment(s): \(HypervisorError.text(Glibc.errno))")
            }
            if let bad = operations.firstIndex(where: { $0.status != BLKBACK_GNTST_OKAY }) {
                throw HypervisorError.grantCopyRefused(domain: domain, ref: segments[bad].ref,
                                                       reason: "hypervisor status \(operations[bad].status)")
            }
        }
    }

    public func map(domain: UInt32, refs: [UInt32], writable: Bool) throws -> GrantMapping {
        guard let first = refs.first else {
            throw HypervisorError.grantRefused(domain: domain, ref: 0, reason: "no grant refs given")
        }
        var mutableRefs = refs
        let prot = writable ? PROT_READ | PROT_WRITE : PROT_READ
        // gntdev maps all refs or none, so the first ref stands for the request in the error.
        guard let base = xengnttab_map_domain_grant_refs(handle, UInt32(refs.count), domain, &mutableRefs, prot) else {
            throw HypervisorError.grantRefused(domain: domain, ref: first,
                                               reason: "\(refs.count) ref(s): \(HypervisorError.text(Glibc.errno))")
        }
        let count = UInt32(refs.count)
        return GrantMapping(domain: domain, refs: refs, writable: writable, base: base) { [self] base in
            if xengnttab_unmap(handle, base, count) != 0 {
                throw HypervisorError.grantUnmapFailed(domain: domain, pages: Int(count), errno: Glibc.errno)
            }
        }
    }
}
