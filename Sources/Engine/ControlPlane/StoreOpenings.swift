import Foundation
import VBDInterface

/// A backing store opened and prepared (`DataPlane.prepare`; nil without a data plane).
struct OpenedStore: Sendable {
    let store: BackingStore
    let prepared: (any PreparedStore)?
}

/// Backing stores are opened and tried here, off the control-plane thread: that is I/O on
/// the store, and a slow or remote file system must not stall every other VBD's xenstore
/// handling. Results come back to the control-plane thread through `completed()`, which its
/// loop calls once woken.
final class StoreOpenings: @unchecked Sendable {
    struct Completion {
        let vbd: VBDIdentity
        /// The ticket `start` returned: unique in the process, so an answer for a device
        /// since removed never reaches a new device of the same name.
        let ticket: UInt64
        let result: Result<OpenedStore, any Error>
    }

    private let lock = NSLock()
    private var done: [Completion] = []
    private var lastTicket: UInt64 = 0
    private let wake: @Sendable () -> Void
    private let queue = DispatchQueue(label: "blkback.store-opening", attributes: .concurrent)

    init(wake: @escaping @Sendable () -> Void) { self.wake = wake }

    /// Runs `work` on another thread; returns the ticket its completion will carry.
    func start(_ vbd: VBDIdentity, _ work: @escaping @Sendable () throws -> OpenedStore) -> UInt64 {
        let ticket = lock.withLock {
            lastTicket += 1
            return lastTicket
        }
        queue.async { [self] in
            let result = Result { try work() }
            lock.withLock { done.append(Completion(vbd: vbd, ticket: ticket, result: result)) }
            wake()
        }
        return ticket
    }

    /// The openings finished since the last call.
    func completed() -> [Completion] {
        lock.withLock {
            defer { done.removeAll() }
            return done
        }
    }
}
