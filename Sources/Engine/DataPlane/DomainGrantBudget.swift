import Synchronization
import VBDInterface

/// The grant pages one guest may have mapped in this daemon at once, over all its VBDs and
/// rings. Every mapping takes one of dom0's maptrack entries, which Xen bounds for all guests
/// together (max_maptrack_frames; 524,288 entries by default), and a guest's rings alone
/// could ask for more than that (ring slots × segments × queues × disks). Data pages over the
/// cap travel by grant copy, which maps nothing; requests are never refused for it. Indirect
/// descriptor pages are not counted: at most 8 per ring are mapped, only while one request is
/// decoded.
final class DomainGrantBudget: Sendable {
    let limit: Int
    private let used = Atomic<Int>(0)

    init(limit: Int) { self.limit = limit }

    /// Takes one page of the budget; false when the guest is at its cap.
    func take() -> Bool {
        var current = used.load(ordering: .relaxed)
        while current < limit {
            let (exchanged, original) = used.compareExchange(expected: current, desired: current + 1, ordering: .relaxed)
            if exchanged { return true }
            current = original
        }
        return false
    }

    func give(_ count: Int) {
        guard count > 0 else { return }
        used.subtract(count, ordering: .relaxed)
    }

    /// Pages counted now.
    var inUse: Int { used.load(ordering: .relaxed) }
}

/// One budget per guest domain, shared by every ring of its VBDs.
final class DomainGrantBudgets: Sendable {
    let limit: Int
    private let budgets = Locked<[UInt32: DomainGrantBudget]>([:])

    init(limit: Int) { self.limit = limit }

    func budget(of domain: UInt32) -> DomainGrantBudget {
        budgets.withLock { budgets in
            if let budget = budgets[domain] { return budget }
            let budget = DomainGrantBudget(limit: limit)
            budgets[domain] = budget
            return budget
        }
    }
}
