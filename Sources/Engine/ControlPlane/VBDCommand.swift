import Blkif
import Foundation
import VBDInterface
import Xenbus

/// What an operator can ask of one VBD through the API (POST …/state). Each is a xenbus
/// state change the backend makes on its own side; the frontend follows the protocol.
public enum VBDStateCommand: String, Sendable, CaseIterable {
    /// Backend → Closing, as a toolstack-initiated close: the frontend answers Closed, the
    /// backend then releases the rings (once in-flight I/O drained) and goes Closed.
    case closing
    /// The backend stops serving now: rings released once in-flight I/O drained, backend → Closed.
    case closed
    /// From Closed (or Closing with the rings released) and a frontend that closed: the
    /// backend offers the device again (InitWait) so the frontend renegotiates.
    case reconnect
}

/// What an operator asks of one VBD: a state change (POST …/state) or new QoS limits
/// (PUT …/qos).
public enum VBDCommand: Sendable, CustomStringConvertible {
    case state(VBDStateCommand)
    case qos(QoSLimits)
    /// Read the store's size again and tell a connected frontend (POST …/resize).
    case resize

    public var description: String {
        switch self {
        case .state(let command): "\(command)"
        case .qos: "qos"
        case .resize: "resize"
        }
    }
}

/// Which VBD an operator means: its domid and devid, and its kind when more than one is
/// served. Parsed once from the API path; the API and the control plane resolve it by the
/// same rule (`pick`).
public struct VBDSelector: Sendable, Equatable, CustomStringConvertible {
    public let domid: DomainID
    public let devid: UInt32
    /// nil: any kind; the first in (kind, domid, devid) order wins.
    public let kind: String?

    public init(domid: DomainID, devid: UInt32, kind: String? = nil) {
        self.domid = domid
        self.devid = devid
        self.kind = kind
    }

    public func matches(_ identity: VBDIdentity) -> Bool {
        identity.domid == domid && identity.devid == devid && (kind == nil || identity.kind == kind)
    }

    /// The first of `items` (by identity order) this selector means.
    public func pick<Item>(_ items: some Sequence<Item>, identity: (Item) -> VBDIdentity) -> Item? {
        items.filter { matches(identity($0)) }.min { identity($0) < identity($1) }
    }

    /// The kind is client text: shown sanitized.
    public var description: String { "\(domid)/\(devid)" + (kind.map { " of kind \(XenbusValue.sanitized($0))" } ?? "") }

    /// The one line for a VBD that is not served.
    public var notFound: String { "no VBD \(self); GET /v1/vbds lists them" }
}

/// Why a command was not carried out.
public enum VBDCommandError: Error, Equatable, Sendable, CustomStringConvertible {
    /// No VBD with that domid/devid (and kind) is served.
    case unknownDevice
    /// The VBD's current state forbids the command; the line says why and what to do.
    case conflict(String)
    /// The control plane is stopping or did not answer in time.
    case unavailable(String)

    public var description: String {
        switch self {
        case .unknownDevice: "no such VBD"
        case .conflict(let reason), .unavailable(let reason): reason
        }
    }
}

/// A command on its way to the control-plane thread and its answer on the way back.
final class PendingCommand: @unchecked Sendable {
    let command: VBDCommand
    let selector: VBDSelector
    private let lock = NSLock()
    private var whenAnswered: (@Sendable (Result<VBDSnapshot, VBDCommandError>) -> Void)?

    init(_ command: VBDCommand, selector: VBDSelector,
         whenAnswered: @escaping @Sendable (Result<VBDSnapshot, VBDCommandError>) -> Void) {
        self.command = command
        self.selector = selector
        self.whenAnswered = whenAnswered
    }

    /// The first answer wins (a late one after a timeout is dropped).
    func answer(_ result: Result<VBDSnapshot, VBDCommandError>) {
        let first = lock.withLock {
            defer { whenAnswered = nil }
            return whenAnswered
        }
        first?(result)
    }

    /// Answers 503 after `seconds` unless the control plane answered before.
    func expire(after seconds: Double) {
        DispatchQueue.global().asyncAfter(deadline: .now() + seconds) { [self] in
            answer(.failure(.unavailable("the control plane did not answer within \(Int(seconds)) s; retry")))
        }
    }
}
