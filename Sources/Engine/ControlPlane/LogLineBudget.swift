/// At most `limit` log lines per window for one source (a guest's state changes): a guest
/// flapping its state cannot flood dom0's log. Lines over the budget are counted, and the
/// count is reported when the next window opens.
struct LogLineBudget {
    let limit: Int
    let windowNanoseconds: UInt64
    private var windowStart: UInt64?
    private var used = 0
    private var suppressed = 0

    init(limit: Int, windowSeconds: UInt64) {
        self.limit = limit
        windowNanoseconds = windowSeconds * 1_000_000_000
    }

    /// Whether a line may be logged now, and how many lines the window that just closed
    /// kept back (to be reported once).
    mutating func take(now: UInt64) -> (allowed: Bool, suppressedBefore: Int) {
        var reported = 0
        if windowStart.map({ now &- $0 >= windowNanoseconds }) ?? true {
            reported = suppressed
            windowStart = now
            used = 0
            suppressed = 0
        }
        guard used < limit else {
            suppressed += 1
            return (false, reported)
        }
        used += 1
        return (true, reported)
    }
}
