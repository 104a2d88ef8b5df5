import Xenbus

/// Which VBD: backend/<kind>/<domid>/<devid>, as xenbus names the device. The key the control
/// plane keeps devices under, and what the data plane and the API say a VBD is.
public struct VBDIdentity: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The backend tree (vbd, vbd3, qdisk, ...).
    public let kind: String
    /// The frontend's domain.
    public let domid: DomainID
    /// The virtual device number (the frontend directory's name; blkif `handle`).
    public let devid: UInt32

    public init(kind: String, domid: DomainID, devid: UInt32) {
        self.kind = kind
        self.domid = domid
        self.devid = devid
    }

    /// From the directory names under backend/<kind>; nil for names xenbus would not bind
    /// (not canonical numbers, a reserved domid).
    public init?(kind: String, domid: some StringProtocol, devid: some StringProtocol) {
        guard let domain = DomainID(pathElement: domid), let device = XenbusValue.pathNumber(devid) else { return nil }
        self.init(kind: kind, domid: domain, devid: device)
    }

    /// "<kind>/<domid>/<devid>": the tail of the backend path, and how logs name the VBD.
    public var description: String { "\(kind)/\(domid)/\(devid)" }

    /// Parses `description` back.
    public init?(description text: some StringProtocol) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 3 else { return nil }
        self.init(kind: String(parts[0]), domid: parts[1], devid: parts[2])
    }

    public static func < (lhs: VBDIdentity, rhs: VBDIdentity) -> Bool {
        (lhs.kind, lhs.domid.rawValue, lhs.devid) < (rhs.kind, rhs.domid.rawValue, rhs.devid)
    }
}
