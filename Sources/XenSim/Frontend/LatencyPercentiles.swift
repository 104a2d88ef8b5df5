/// Request latencies in a log-linear histogram (like HdrHistogram): each power of two from
/// 1 ns up is split into 64 buckets, so a percentile is exact to within 1/64 (1.6 %) while
/// memory stays fixed however long the workload runs.
public struct LatencyPercentiles: Sendable {
    static let subBucketBits = 6
    static let subBuckets = 1 << subBucketBits
    private var counts = [UInt64](repeating: 0, count: (64 - subBucketBits + 1) * (1 << subBucketBits))
    public private(set) var count: UInt64 = 0
    public private(set) var sumNanoseconds: UInt64 = 0
    public private(set) var maxNanoseconds: UInt64 = 0

    public init() {}

    public mutating func record(nanoseconds value: UInt64) {
        counts[Self.bucket(of: value)] += 1
        count += 1
        sumNanoseconds &+= value
        maxNanoseconds = max(maxNanoseconds, value)
    }

    /// The smallest recorded-bucket value v such that at least `percent` % of samples are ≤ v
    /// (the bucket's upper bound, capped at the maximum seen); 0 when empty.
    public func percentile(_ percent: Double) -> UInt64 {
        guard count > 0 else { return 0 }
        // The epsilon keeps 99.9 % of 10000 at rank 9990 despite binary floating point.
        let rank = max(1, UInt64((percent / 100 * Double(count) - 1e-6).rounded(.up)))
        var seen: UInt64 = 0
        for (index, bucketCount) in counts.enumerated() where bucketCount > 0 {
            seen += bucketCount
            if seen >= rank { return min(Self.upperBound(of: index), maxNanoseconds) }
        }
        return maxNanoseconds
    }

    public var meanNanoseconds: Double { count == 0 ? 0 : Double(sumNanoseconds) / Double(count) }

    /// Values below 64 get a bucket each; above, bucket = (exponent, top 6 bits after the leading one).
    static func bucket(of value: UInt64) -> Int {
        if value < UInt64(subBuckets) { return Int(value) }
        let exponent = 63 - value.leadingZeroBitCount  // ≥ subBucketBits
        let shift = exponent - subBucketBits
        let mantissa = Int((value >> UInt64(shift)) & UInt64(subBuckets - 1))
        return (shift + 1) * subBuckets + mantissa
    }

    /// The largest value that falls into bucket `index`.
    static func upperBound(of index: Int) -> UInt64 {
        if index < subBuckets { return UInt64(index) }
        let shift = index / subBuckets - 1
        let mantissa = UInt64(index % subBuckets) | UInt64(subBuckets)
        let low = mantissa << UInt64(shift)
        return low + ((1 << UInt64(shift)) - 1)
    }
}
