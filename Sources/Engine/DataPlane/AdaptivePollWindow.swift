/// How long a ring worker spins on its ring and its completion queue before it sleeps: the
/// adaptive polling of QEMU's event loop (poll-max-ns). Sleeping costs a wakeup when work
/// comes, and on a virtual machine a wakeup is an inter-processor interrupt and a VM exit, tens
/// of microseconds; spinning costs CPU. So the window grows (from 4 µs, doubling up to
/// `maximum`) while work keeps arriving within `maximum` of going idle, and closes as soon
/// as a wait outlasts it: an idle or slow ring never spins.
struct AdaptivePollWindow: Sendable {
    /// Nanoseconds; 0 never polls.
    let maximum: UInt64
    /// The window the next wait spins for, in nanoseconds (0: sleep at once).
    private(set) var current: UInt64 = 0

    static let initial: UInt64 = 4_000

    init(maximum: UInt64) {
        self.maximum = maximum
    }

    /// Adapts to one wait that took `waited` nanoseconds (polling and sleeping together).
    mutating func record(waited: UInt64) {
        guard maximum > 0 else { return }
        if current > 0 && waited <= current { return }   // the poll caught it: keep the window
        if waited > maximum {
            current = 0
        } else if current < maximum {
            current = current == 0 ? min(Self.initial, maximum) : min(current * 2, maximum)
        }
    }
}
