import Foundation

/// How values read from xenstore are taken apart and shown: the one parser of numbers the
/// xenbus boundary uses (the role of xenbus_read_unsigned) and the one sanitizer for guest
/// text that reaches a log or an error node.
public enum XenbusValue {
    /// Decimal digits only (surrounding ASCII blanks allowed): stricter than sscanf("%u"),
    /// which would take "-1" or "12abc".
    public static func unsigned(_ text: String) -> UInt64? {
        let words = text.utf8.split(whereSeparator: { $0 == 0x20 || $0 == 0x09 || $0 == 0x0a })
        guard words.count == 1, let digits = words.first, digits.count <= 20,
              digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
        return UInt64(String(decoding: digits, as: UTF8.self))
    }

    /// A number as it names a directory in a path (`backend/vbd/<domid>/<devid>`, the API's
    /// `/v1/vbds/<domid>/<devid>`): canonical decimal, so one device has one name.
    public static func pathNumber(_ text: some StringProtocol) -> UInt32? {
        guard let number = UInt32(text), String(number) == text else { return nil }
        return number
    }

    /// A xenbus flag ("online", "discard-enable"): a number, non-zero is true; `fallback`
    /// when missing or not a number, as xenbus_read_unsigned reads it.
    public static func flag(_ text: String?, default fallback: Bool) -> Bool {
        text.flatMap(unsigned).map { $0 != 0 } ?? fallback
    }

    /// Guest text for a log or error node: printable ASCII as it is, everything else
    /// escaped (\xNN, \u{NNNN}; a backslash as \\), at most 64 characters of the original
    /// ("…" marks the cut), so a hostile guest can neither forge log lines nor fill them.
    public static func sanitized(_ text: String) -> String {
        var out = ""
        for scalar in text.unicodeScalars.prefix(64) {
            switch scalar.value {
            case 0x5c: out += "\\\\"
            case 0x20..<0x7f: out.unicodeScalars.append(scalar)
            case 0..<0x80: out += "\\x" + (scalar.value < 0x10 ? "0" : "") + String(scalar.value, radix: 16)
            default: out += "\\u{" + String(scalar.value, radix: 16) + "}"
            }
        }
        return text.unicodeScalars.count > 64 ? out + "…" : out
    }
}
