/// An error that knows its errno: what a xenbus_dev_fatal report (`<errno> <message>` in the
/// error node) starts with. The control plane reports any such error without a catch per type.
public protocol ErrnoCarrying: Error, CustomStringConvertible {
    var errno: Int32 { get }
}

extension XenStoreError: ErrnoCarrying {}

/// A xenbus_dev_fatal report as the step that failed words it: errno and the whole line
/// for the error node (reported as is, with no step name in front).
public struct XenbusFailure: ErrnoCarrying, Equatable, Sendable {
    public var errno: Int32
    public var message: String

    public init(errno: Int32, message: String) {
        self.errno = errno
        self.message = message
    }

    public var description: String { message }
}
