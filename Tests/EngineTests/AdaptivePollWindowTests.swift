@testable import DataPlane
import Testing

/// The ring worker's polling window: grows while waits are short, closes after a long one.
@Suite struct AdaptivePollWindowTests {
    @Test func shortWaitsOpenTheWindowDoublingUpToTheMaximum() {
        var window = AdaptivePollWindow(maximum: 32_000)
        #expect(window.current == 0)
        var seen: [UInt64] = []
        for _ in 0..<6 {
            window.record(waited: 20_000)   // longer than the window, within the maximum
            seen.append(window.current)
        }
        #expect(seen == [4_000, 8_000, 16_000, 32_000, 32_000, 32_000])
    }

    @Test func aWaitThePollCaughtKeepsTheWindow() {
        var window = AdaptivePollWindow(maximum: 32_000)
        window.record(waited: 10_000)
        window.record(waited: 10_000)
        #expect(window.current == 8_000)
        window.record(waited: 3_000)
        #expect(window.current == 8_000)
    }

    @Test func aWaitLongerThanTheMaximumClosesIt() {
        var window = AdaptivePollWindow(maximum: 32_000)
        for _ in 0..<4 { window.record(waited: 1_000) }
        window.record(waited: 1_000)   // caught by the poll: no change
        #expect(window.current == 4_000)
        window.record(waited: 5_000)
        #expect(window.current == 8_000)
        window.record(waited: 40_000)
        #expect(window.current == 0)
    }

    @Test func aSmallMaximumCapsTheFirstWindowAndZeroNeverPolls() {
        var small = AdaptivePollWindow(maximum: 2_000)
        small.record(waited: 1_500)
        #expect(small.current == 2_000)
        var off = AdaptivePollWindow(maximum: 0)
        for waited in [0, 100, 1_000_000] as [UInt64] { off.record(waited: waited) }
        #expect(off.current == 0)
    }
}
