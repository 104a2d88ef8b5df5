import VBDInterface
import Foundation
import Xenbus

/// An operator's state commands (POST …/state).
extension VBD {
    /// Carries out `command` (see VBDStateCommand). Throws `.conflict` with one line when the
    /// current state forbids it; nothing changes then.
    func perform(_ command: VBDCommand) throws(VBDCommandError) {
        do {
            switch command {
            case .state(.closing): try close()
            case .state(.closed): try closeNow()
            case .state(.reconnect): try offerAgain()
            case .qos(let limits): try setQoS(limits)
            case .resize:
                guard disk.store != nil else {
                    throw VBDCommandError.conflict("\(nodename) has no backing store open yet; nothing to resize")
                }
                try checkSize()
            }
        } catch let error as VBDCommandError {
            throw error
        } catch {
            logger.warning("operator \(command) failed: \(error)")
            throw VBDCommandError.conflict("\(command) on \(nodename) failed: \(error)")
        }
    }

    /// Writes the limits where a toolstack sets them (the backend's qos-* keys, so that they
    /// survive a daemon restart and a reconnect), in one transaction, then applies them to
    /// the rings now.
    private func setQoS(_ limits: QoSLimits) throws {
        try store.transaction { transaction in
            guard try store.read(backendPath + "/state", transaction: transaction) != nil else { return }
            for (name, field) in QoSLimits.fields {
                let key = backendPath + "/" + QoSLimits.xenstoreKey(name)
                let value = limits[keyPath: field]
                if value > 0 {
                    try store.write(key, "\(value)", transaction: transaction)
                } else if try store.read(key, transaction: transaction) != nil {
                    try store.remove(key, transaction: transaction)
                }
            }
        }
        qos = limits
        rings.connection?.setQoS(limits)
        context.events.publish(.qosChanged, identity, QoSLimits.fields.map { ($0.name, .number(limits[keyPath: $0.value])) })
        logger.info("operator: QoS limits \(limits.isUnlimited ? "removed" : "set")")
    }

    private func close() throws {
        guard [.initWait, .initialised, .connected].contains(backendState) else {
            throw VBDCommandError.conflict("backend of \(nodename) is \(backendState); closing applies to InitWait, Initialised or Connected")
        }
        // The frontend's Closed then reaches frontendChanged: disconnect, Closed.
        try switchState(.closing)
        logger.info("operator: closing")
    }

    private func closeNow() throws {
        guard backendState != .closed else {
            throw VBDCommandError.conflict("backend of \(nodename) is already Closed")
        }
        try closeWhenDrained()
        logger.info("operator: closed")
    }

    private func offerAgain() throws {
        guard try isOnline() else {
            throw VBDCommandError.conflict("\(nodename) is being removed (online=0); it cannot reconnect")
        }
        guard backendState == .closed || backendState == .closing else {
            throw VBDCommandError.conflict("backend of \(nodename) is \(backendState); reconnect applies to a Closed or Closing device")
        }
        guard rings.connection == nil, !rings.disconnectPending else {
            throw VBDCommandError.conflict("\(nodename) still has I/O in flight on its rings; retry once it drained")
        }
        // A frontend still holding its session would answer our InitWait with a late Closed
        // and close the device again.
        let frontend = FrontendStateReading(node: try store.read(frontendPath + "/state"))
        guard let state = frontend.state, [.initialising, .initWait, .closed].contains(state) else {
            throw VBDCommandError.conflict("frontend of \(nodename) is \(frontend); reconnect once it has closed")
        }
        frontendState = frontend
        rings.description = nil
        lastError = nil
        try switchState(.initWait)
        logger.info("operator: reconnect; waiting for the frontend")
    }
}
