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
