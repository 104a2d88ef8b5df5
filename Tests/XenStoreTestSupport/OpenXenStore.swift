import Foundation
import Xenbus

/// libxenstore takes the xenstored socket only from XENSTORED_PATH, read in xs_open. Changing
/// the environment while other tests of this process spawn children (which copy it) or read
/// it is a race, so it is set once, for the process's whole life, to a symlink of its own;
/// each open points the symlink at the socket wanted first. Children the integration tests
/// start are given XENSTORED_PATH explicitly or not at all (their Harness drops this one).
private let xenstoreLink = NSTemporaryDirectory() + "blkback-tests-\(getpid())-xenstored.sock"
private let linkLock: NSLock = {
    setenv("XENSTORED_PATH", xenstoreLink, 1)
    return NSLock()
}()

/// A libxenstore connection to the xenstored listening on `socket`.
public func openXenStore(socket: String) throws -> XenStore {
    try linkLock.withLock {
        unlink(xenstoreLink)
        guard symlink(socket, xenstoreLink) == 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        defer { unlink(xenstoreLink) }
        return try XenStore()
    }
}
