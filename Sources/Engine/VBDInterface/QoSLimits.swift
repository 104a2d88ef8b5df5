import Foundation

/// One VBD's I/O limits: operations and bytes per second for reads, writes or both, and how
/// many seconds of unused allowance a guest may spend at once. 0 means no limit. Set by a
/// toolstack in the backend directory (`qos-total-iops`, …) and by an operator through the API.
public struct QoSLimits: Sendable, Equatable {
    public var totalIOPS: UInt64 = 0
    public var readIOPS: UInt64 = 0
    public var writeIOPS: UInt64 = 0
    public var totalBytesPerSecond: UInt64 = 0
    public var readBytesPerSecond: UInt64 = 0
    public var writeBytesPerSecond: UInt64 = 0
    /// Allowance that may accumulate while the guest is idle, in seconds of each limit.
    public var burstSeconds: UInt64 = 0

    public init() {}

    public static let none = QoSLimits()

    /// Above this a value is a mistake, not a limit (10^12 operations or bytes per second,
    /// a burst of a day).
    public static let largestRate: UInt64 = 1_000_000_000_000
    public static let largestBurstSeconds: UInt64 = 86_400

    /// Each field with its API name (the xenstore key is `qos-` and the name with dashes).
    public static let fields: [(name: String, value: WritableKeyPath<QoSLimits, UInt64> & Sendable)] = [
        ("total_iops", \.totalIOPS), ("read_iops", \.readIOPS), ("write_iops", \.writeIOPS),
        ("total_bytes_per_second", \.totalBytesPerSecond), ("read_bytes_per_second", \.readBytesPerSecond),
        ("write_bytes_per_second", \.writeBytesPerSecond), ("burst_seconds", \.burstSeconds),
    ]

    /// `qos-total-iops` for `total_iops`.
    public static func xenstoreKey(_ name: String) -> String {
        "qos-" + name.replacingOccurrences(of: "_", with: "-")
    }

    public var isUnlimited: Bool { Self.fields.allSatisfy { self[keyPath: $0.value] == 0 } }

    /// The largest value `name` may take.
    public static func largest(_ name: String) -> UInt64 {
        name == "burst_seconds" ? largestBurstSeconds : largestRate
    }

    /// The limits a toolstack wrote into the backend directory (keys read through `lookup`);
    /// a key that is not a number within its range is reported and ignored.
    public static func read(_ lookup: (String) throws -> String?) rethrows -> (limits: QoSLimits, ignored: [String]) {
        var limits = QoSLimits()
        var ignored: [String] = []
        for (name, field) in fields {
            let key = xenstoreKey(name)
            guard let text = try lookup(key) else { continue }
            guard let value = UInt64(text.trimmingCharacters(in: .whitespaces)), value <= largest(name) else {
                ignored.append(key)
                continue
            }
            limits[keyPath: field] = value
        }
        return (limits, ignored)
    }
}
