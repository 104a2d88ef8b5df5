import Glibc

/// A failed hypervisor service call. `description` is one line saying what failed and what to
/// do, ready for an operator (the daemon prints it and exits 2 when opening fails).
public enum HypervisorError: Error, CustomStringConvertible, Sendable, Equatable {
    /// A Xen device node could not be opened (no Xen, module not loaded, not dom0).
    case deviceUnavailable(device: String, errno: Int32, module: String)
    /// The simulator's state under `--sim DIR` is missing or unusable.
    case simulatorUnavailable(path: String, errno: Int32)
    /// A grant could not be mapped; `ref` is the first offending grant reference.
    case grantRefused(domain: UInt32, ref: UInt32, reason: String)
    /// A mapping could not be undone.
    case grantUnmapFailed(domain: UInt32, pages: Int, errno: Int32)
    /// A grant copy was refused; `ref` is the first offending grant reference.
    case grantCopyRefused(domain: UInt32, ref: UInt32, reason: String)
    /// An event channel operation failed with an errno (as Xen's hypercall would return it).
    case eventChannel(operation: String, port: UInt32, errno: Int32)

    public var description: String {
        switch self {
        case let .deviceUnavailable(device, errno, module):
            return "cannot open \(device): \(HypervisorError.text(errno)); load the \(module) module "
                + "(modprobe \(module)) or run in dom0 under Xen"
        case let .simulatorUnavailable(path, errno):
            return "cannot use simulated hypervisor state \(path): \(HypervisorError.text(errno)); "
                + "start `xensim run --dir DIR` and create the domain with `xensim domain create`"
        case let .grantRefused(domain, ref, reason):
            return "cannot map grant ref \(ref) of domain \(domain): \(reason)"
        case let .grantCopyRefused(domain, ref, reason):
            return "cannot copy grant ref \(ref) of domain \(domain): \(reason)"
        case let .grantUnmapFailed(domain, pages, errno):
            return "cannot unmap \(pages) granted page(s) of domain \(domain): \(HypervisorError.text(errno))"
        case let .eventChannel(operation, port, errno):
            return "event channel \(operation) (port \(port)) failed: \(HypervisorError.text(errno))"
        }
    }

    /// The errno carried by the error, if any (tests and callers branch on it).
    public var errno: Int32? {
        switch self {
        case let .deviceUnavailable(_, e, _), let .simulatorUnavailable(_, e),
             let .grantUnmapFailed(_, _, e), let .eventChannel(_, _, e):
            return e
        case .grantRefused, .grantCopyRefused:
            return nil
        }
    }

    public static func text(_ errno: Int32) -> String { String(cString: strerror(errno)) }
}
