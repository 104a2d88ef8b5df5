import Foundation

/// State shared between threads behind a pthread mutex (NSLock), such as the event log (the
/// control plane, the rings and the HTTP threads) or a command's answer. ThreadSanitizer sees
/// a pthread mutex, where Synchronization.Mutex's futex is invisible to it and every access
/// would be reported as a race.
public final class Locked<State>: @unchecked Sendable {
    private let lock = NSLock()
    private var state: State

    public init(_ state: State) { self.state = state }

    public func withLock<Result>(_ body: (inout State) throws -> Result) rethrows -> Result {
        lock.lock()
        defer { lock.unlock() }
        return try body(&state)
    }
}
