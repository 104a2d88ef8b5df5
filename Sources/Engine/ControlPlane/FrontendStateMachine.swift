import Blkif
import Foundation
import Glibc
import VBDInterface
import Xenbus

/// One step the backend takes when the frontend's state changes (xenbus.c frontend_changed).
public enum FrontendChangeAction: Equatable, Sendable {
    /// Write our `state` (xenbus_switch_state; no write when already there).
    case switchState(XenbusState)
    /// Release the rings (xen_blkif_disconnect). In-flight I/O may make it busy.
    case disconnect
    /// Read the frontend's ring description, map the rings, publish the disk, go Connected.
    case connect
    /// Stop serving and forget the device (device_unregister → xen_blkbk_remove).
    case unregister
    /// xenbus_dev_fatal: error node plus Closing.
    case fatal(errno: Int32, message: String)
}

/// The decision table of frontend_changed in today's xen-blkback, as a pure function.
///
/// Differences from the kernel, on purpose:
/// - frontend InitWait is waited out (the kernel's default case would make it fatal): a
///   frontend in InitWait has not published its rings yet, and the protocol lets either side
///   pass through InitWait.
/// - a non-numeric state is fatal rather than read as Unknown (which would silently drop the
///   device); a missing node is still Unknown, as in the kernel.
public func frontendChanged(backend: XenbusState, frontend: FrontendStateReading,
                            online: Bool) -> [FrontendChangeAction] {
    guard let state = frontend.state else {
        return [.fatal(errno: EINVAL, message: "saw state \(frontend) at frontend")]
    }
    switch state {
    case .initialising:
        // A frontend starting over after we closed: offer the device again.
        return backend == .closed ? [.switchState(.initWait)] : []
    case .initWait:
        return []
    case .initialised, .connected:
        // Both cover watches that fired in quick succession and skipped a state.
        if backend == .connected { return [] }
        return [.disconnect, .connect]
    case .closing:
        return [.switchState(.closing)]
    case .closed:
        let closed: [FrontendChangeAction] = [.disconnect, .switchState(.closed)]
        return online ? closed : closed + [.unregister]
    case .unknown:
        return [.unregister]
    case .reconfiguring, .reconfigured:
        return [.fatal(errno: EINVAL, message: "saw state \(state.rawValue) at frontend")]
    }
}
