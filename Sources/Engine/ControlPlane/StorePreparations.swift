import Foundation
import VBDInterface

/// `DataPlane.prepare` runs here, off the control-plane thread: it does I/O on the backing
/// store, and a slow or remote file system must not stall every other VBD's xenstore
/// handling (least of all for a guest that reconnects in a loop). Results come back to the
/// control-plane thread through `completed()`, which its loop calls once woken.
final class StorePreparations: @unchecked Sendable {
    struct Completion {
        let vbd: VBDIdentity
        /// Which of the VBD's preparations this answers (a later one makes it stale).
        let generation: UInt64
        let result: Result<any PreparedStore, any Error>
    }

    private let lock = NSLock()
    private var done: [Completion] = []
    private let wake: @Sendable () -> Void
    private let queue = DispatchQueue(label: "blkback.store-preparation", attributes: .concurrent)

    init(wake: @escaping @Sendable () -> Void) { self.wake = wake }

    func start(_ vbd: VBDIdentity, generation: UInt64, _ work: @escaping @Sendable () throws -> any PreparedStore) {
        queue.async { [self] in
            let result = Result { try work() }
            lock.withLock { done.append(Completion(vbd: vbd, generation: generation, result: result)) }
            wake()
        }
    }

    /// The preparations finished since the last call.
    func completed() -> [Completion] {
        lock.withLock {
            defer { done.removeAll() }
            return done
        }
    }
}
