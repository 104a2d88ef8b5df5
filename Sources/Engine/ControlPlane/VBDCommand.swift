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
    let command: VBDStateCommand
    let domid: UInt32
    let devid: UInt32
    let kind: String?
    private let answered = DispatchSemaphore(value: 0)
    private let lock = NSLock()
    private var result: Result<VBDSnapshot, VBDCommandError>?

    init(_ command: VBDStateCommand, domid: UInt32, devid: UInt32, kind: String?) {
        self.command = command
        self.domid = domid
        self.devid = devid
        self.kind = kind
    }

    /// The first answer wins (a late one after a timeout is dropped).
    func answer(_ result: Result<VBDSnapshot, VBDCommandError>) {
        let first = lock.withLock {
            guard self.result == nil else { return false }
            self.result = result
            return true
        }
        if first { answered.signal() }
    }

    func wait(timeout: Double) -> Result<VBDSnapshot, VBDCommandError> {
        if answered.wait(timeout: .now() + timeout) == .timedOut {
            answer(.failure(.unavailable("the control plane did not answer within \(Int(timeout)) s; retry")))
        }
        return lock.withLock { result! }
    }
}
