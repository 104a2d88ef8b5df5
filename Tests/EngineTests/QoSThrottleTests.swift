@testable import DataPlane
import Engine
import Testing

/// The token buckets behind per-VBD QoS, on a clock the test moves (pure logic: no sleeping).
@Suite struct QoSThrottleTests {
    static let second: UInt64 = 1_000_000_000

    /// Admits requests as fast as the throttle allows over `seconds` of simulated time and
    /// returns how many went through.
    func admitted(_ throttle: QoSThrottle, isWrite: Bool = false, bytes: UInt64 = 4096, seconds: UInt64, from start: UInt64 = 0) -> Int {
        var now = start
        var count = 0
        while now < start + seconds * Self.second {
            if let wait = throttle.admit(isWrite: isWrite, bytes: bytes, now: now) {
                now += max(wait, 1)
            } else {
                count += 1
            }
        }
        return count
    }

    @Test func unlimitedAdmitsEverything() {
        let throttle = QoSThrottle(.none, now: 0)
        #expect((0..<1000).allSatisfy { _ in throttle.admit(isWrite: true, bytes: 1 << 20, now: 0) == nil })
    }

    @Test func anIOPSLimitHoldsOverTimeAfterItsBurst() {
        var limits = QoSLimits()
        limits.totalIOPS = 1000
        let throttle = QoSThrottle(limits, now: 0)
        // 10 s at 1000 IOPS, plus the 0.1 s the bucket starts with.
        #expect((10_099...10_101).contains(admitted(throttle, seconds: 10)))
    }

    @Test func readAndWriteLimitsApplyToTheirKindOnly() {
        var limits = QoSLimits()
        limits.writeIOPS = 100
        let throttle = QoSThrottle(limits, now: 0)
        #expect((209...211).contains(admitted(throttle, isWrite: true, seconds: 2)))
        #expect(throttle.admit(isWrite: false, bytes: 4096, now: 2 * Self.second) == nil, "reads are not limited")
    }

    @Test func aRequestLargerThanTheBucketGoesAndItsDebtDelaysTheNext() {
        var limits = QoSLimits()
        limits.totalBytesPerSecond = 1 << 20  // 1 MiB/s: the bucket holds 0.1 s, about 100 KiB
        let throttle = QoSThrottle(limits, now: 0)
        #expect(throttle.admit(isWrite: true, bytes: 1 << 20, now: 0) == nil, "a full bucket lets one large request go")
        let wait = throttle.admit(isWrite: true, bytes: 4096, now: 0)
        // About 0.9 s of debt: 1 MiB taken from a bucket of 0.1 s.
        #expect(wait.map { $0 > 850_000_000 && $0 < 950_000_000 } == true, "wait \(String(describing: wait))")
        // Over 10 s of 64 KiB requests the rate is the limit, within the first bucket.
        let count = admitted(throttle, bytes: 65536, seconds: 10, from: Self.second)
        #expect(count >= 159 && count <= 161, "\(count) requests of 64 KiB in 10 s at 1 MiB/s")
    }

    @Test func burstSecondsLetAnIdleGuestCatchUp() {
        var limits = QoSLimits()
        limits.totalIOPS = 100
        limits.burstSeconds = 5
        let throttle = QoSThrottle(limits, now: 0)
        #expect((599...601).contains(admitted(throttle, seconds: 1)), "500 saved up, then 100 in the second")
    }

    @Test func newLimitsTakeEffectAtOnce() {
        var limits = QoSLimits()
        limits.totalIOPS = 10
        let throttle = QoSThrottle(limits, now: 0)
        #expect(throttle.admit(isWrite: false, bytes: 4096, now: 0) == nil, "the bucket holds one request")
        #expect(throttle.admit(isWrite: false, bytes: 4096, now: 0) != nil)
        throttle.update(.none, now: 0)
        #expect(throttle.admit(isWrite: false, bytes: 4096, now: 0) == nil)
        #expect(throttle.limits == .none)
    }
}
