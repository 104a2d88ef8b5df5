import Foundation

/// Sizes on the command line, the way fio and dd spell them: a number of bytes with an
/// optional binary suffix (k/K = KiB, m/M = MiB, g/G = GiB, t/T = TiB; a trailing "iB" or
/// "B" is allowed: 4KiB, 4kB, 4k all mean 4096).
public enum ByteSize {
    public struct ParseError: Error, CustomStringConvertible, Equatable {
        public let text: String
        public var description: String {
            "'\(text)' is not a size: use bytes with an optional suffix k, m, g or t (e.g. 4096, 64k, 1M)"
        }
    }

    public static func parse(_ text: String) throws(ParseError) -> UInt64 {
        var rest = Substring(text.trimmingCharacters(in: .whitespaces))
        for unit in ["iB", "ib", "B", "b"] where rest.hasSuffix(unit) && rest.count > unit.count {
            rest = rest.dropLast(unit.count)
            break
        }
        var shift: UInt64 = 0
        if let last = rest.last, let exponent = "kmgt".firstIndex(of: Character(last.lowercased())) {
            shift = 10 * UInt64("kmgt".distance(from: "kmgt".startIndex, to: exponent) + 1)
            rest = rest.dropLast()
        }
        guard !rest.isEmpty, rest.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let number = UInt64(rest),
              number <= UInt64.max >> shift else {
            throw ParseError(text: text)
        }
        return number << shift
    }

    /// "4 KiB", "1.5 MiB": for messages.
    public static func describe(_ bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(bytes), unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        if unit == 0 { return "\(bytes) B" }
        let rounded = (value * 10).rounded() / 10
        return rounded == rounded.rounded() ? "\(Int(rounded)) \(units[unit])" : "\(rounded) \(units[unit])"
    }
}
