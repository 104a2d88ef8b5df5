import Foundation

/// The API's shared secret. Compared in constant time so a client cannot learn it byte by
/// byte from response times.
public struct BearerToken: Sendable {
    private let secret: [UInt8]

    /// nil for an empty token (after trimming white space).
    public init?(_ text: String) {
        let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !trimmed.isEmpty else { return nil }
        secret = Array(trimmed.utf8)
    }

    /// True when `header` is `Bearer <token>` (scheme case-insensitive, RFC 6750).
    public func authorizes(_ header: String?) -> Bool {
        guard let header else { return false }
        let bytes = Array(header.utf8)
        let scheme = Array("bearer ".utf8)
        guard bytes.count > scheme.count,
              zip(bytes.prefix(scheme.count), scheme).allSatisfy({ ($0 | 0x20) == $1 }) else { return false }
        return Self.constantTimeEqual(Array(bytes.dropFirst(scheme.count)), secret)
    }

    /// Time depends only on the lengths, never on where the bytes differ.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        var difference = UInt8(a.count == b.count ? 0 : 1)
        for index in 0..<max(a.count, b.count) {
            difference |= (index < a.count ? a[index] : 0) ^ (index < b.count ? b[index] : 0)
        }
        return difference == 0
    }
}
