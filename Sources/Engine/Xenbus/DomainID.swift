/// A Xen domain id as xenbus uses it: below DOMID_FIRST_RESERVED. Ids from there on are
/// Xen's own (DOMID_SELF, DOMID_IO, DOMID_XEN, ...) and never name a guest's xenstore tree.
public struct DomainID: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    /// DOMID_FIRST_RESERVED (xen/include/public/xen.h).
    public static let firstReserved: UInt32 = 0x7FF0
    /// The largest id a domain can have.
    public static let largest = DomainID(rawValue: firstReserved - 1)!
    public static let dom0 = DomainID(rawValue: 0)!

    public let rawValue: UInt32

    public init?(rawValue: UInt32) {
        guard rawValue < Self.firstReserved else { return nil }
        self.rawValue = rawValue
    }

    /// A domid as written in a xenstore path or an API path ("7"; not "07", "+7" or " 7").
    public init?(pathElement text: some StringProtocol) {
        guard let number = XenbusValue.pathNumber(text) else { return nil }
        self.init(rawValue: number)
    }

    public var description: String { String(rawValue) }

    public static func < (lhs: DomainID, rhs: DomainID) -> Bool { lhs.rawValue < rhs.rawValue }
}
