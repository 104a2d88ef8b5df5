import Synchronization
import VBDInterface

/// One ring's counters: written by its worker thread, read by anyone. An uncontended lock
/// per update costs about as much as an atomic increment and keeps a snapshot consistent.
final class RingStatistics: Sendable {
    private let values = Locked(VBDStatistics())

    func update(_ body: (inout VBDStatistics) -> Void) { values.withLock { body(&$0) } }

    var snapshot: VBDStatistics { values.withLock { $0 } }
}
