@testable import ControlPlane
import Testing
import Xenbus

/// Guest text in logs: escaped and bounded; and a guest's state changes rate-limited.
struct GuestTextInLogsTests {
    @Test func guestTextIsEscapedAndBounded() {
        #expect(XenbusValue.sanitized("Connected") == "Connected")
        #expect(XenbusValue.sanitized("4\n2026-01-01 info forged line\u{1b}[2J") == "4\\x0a2026-01-01 info forged line\\x1b[2J")
        #expect(XenbusValue.sanitized("a\\b\u{7f}é") == "a\\\\b\\x7f\\u{e9}")
        let long = XenbusValue.sanitized(String(repeating: "x", count: 5000))
        #expect(long == String(repeating: "x", count: 64) + "…")
        // A non-numeric state as the control plane keeps it for its logs and error node.
        let reading = FrontendStateReading(node: "4\r\nfrontend Closed → Connected")
        #expect(reading == .garbage("4\\x0d\\x0afrontend Closed \\u{2192} Connected"))
        #expect(!reading.description.contains("\n"))
    }

    @Test func aFloodOfLinesIsCutToTheBudgetAndCounted() {
        var budget = LogLineBudget(limit: 3, windowSeconds: 10)
        let second: UInt64 = 1_000_000_000
        let first = (0..<10).map { budget.take(now: UInt64($0) * second / 10) }
        #expect(first.map(\.allowed) == [true, true, true] + Array(repeating: false, count: 7))
        #expect(first.allSatisfy { $0.suppressedBefore == 0 })
        // The next window reports what the last one kept back, once.
        let next = budget.take(now: 11 * second)
        #expect(next.allowed && next.suppressedBefore == 7)
        #expect(budget.take(now: 12 * second).suppressedBefore == 0)
    }
}
