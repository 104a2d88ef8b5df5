import VBDInterface

/// Releasing the rings (xen_blkif_disconnect) and forgetting the device (xen_blkbk_remove).
extension VBD {
    /// xen_blkif_disconnect: true when nothing is mapped any more. `handingOver`: the rings
    /// are left to the next daemon (ConnectedRings.handOver).
    func disconnect(handingOver: Bool = false) -> Bool {
        rings.description = nil
        guard let connection = rings.connection else {
            rings.disconnectPending = false
            return true
        }
        if handingOver ? connection.handOver() : connection.disconnect() {
            rings.connection = nil
            rings.features = .none
            rings.disconnectPending = false
            return true
        }
        logger.info("requests still in flight; disconnecting later")
        rings.disconnectPending = true
        return false
    }

    func retryDisconnect() -> Outcome {
        guard disconnect(), rings.closeWhenReleased else { return .keep }
        rings.closeWhenReleased = false
        do {
            try switchState(.closed)
            logger.info("rings released; Closed")
        } catch {
            logger.warning("writing Closed after the rings were released failed: \(error)")
        }
        guard rings.followFrontendAfterClose else { return .keep }
        rings.followFrontendAfterClose = false
        return followFrontendAfterDeferredClose()
    }

    /// Closed now when nothing is mapped; otherwise Closing now (the frontend stops sending)
    /// and Closed once the rings are released (the manager's drain retries call
    /// `retryDisconnect`).
    func closeWhenDrained() throws {
        if disconnect() {
            try switchState(.closed)
        } else {
            rings.closeWhenReleased = true
            try switchState(.closing)
            logger.info("Closed deferred until the requests in flight are answered and their grants unmapped")
        }
    }

    /// `handover`: the daemon stops for a planned restart and leaves every device as the
    /// guests see it, for the next one to take over.
    enum StopReason { case removed, unregistered, shutdown, handover }

    /// Rings that still had requests in flight when the device stopped, and what to do once
    /// they are released.
    struct PendingRelease {
        let identity: VBDIdentity
        let rings: any ConnectedRings
        let handingOver: Bool
        let afterwards: () -> Void

        /// True (and `afterwards` done) once the rings are released.
        func retry() -> Bool {
            guard handingOver ? rings.handOver() : rings.disconnect() else { return false }
            afterwards()
            return true
        }
    }

    /// xen_blkbk_remove: stop watching and serving, close the backing store. After
    /// `unregistered` the backend is left Closed like xenbus_dev_remove leaves it; a removed
    /// directory gets no writes; at daemon shutdown only connected devices are closed, the
    /// others stay for the next instance to adopt; at a handover nothing is written and the
    /// rings' journals stay for the next instance to take over. Closed is written only once the rings are
    /// released (xen_blkif_disconnect comes first), so a frontend that sees Closed can take
    /// its grants back; rings still busy are returned for the caller to drain.
    func stop(_ reason: StopReason) -> PendingRelease? {
        let wasConnected = backendState == .connected
        for (path, token) in watches { try? store.unwatch(path, token: token.text) }
        watches.removeAll()
        let busy = disconnect(handingOver: reason == .handover) ? nil : rings.connection
        rings.connection = nil
        rings.closeWhenReleased = false
        rings.followFrontendAfterClose = false
        disk.store = nil
        disk.prepared = nil
        disk.opening = nil
        let afterwards: () -> Void
        switch reason {
        case .removed:
            logger.info("backend directory removed; device forgotten")
            afterwards = {}
        case .unregistered:
            afterwards = { [self] in
                try? switchState(.closed)
                logger.info("device unregistered")
            }
        case .shutdown:
            afterwards = { [self] in if wasConnected { try? switchState(.closed) } }
        case .handover:
            afterwards = {}
        }
        guard let busy else {
            afterwards()
            return nil
        }
        return PendingRelease(identity: identity, rings: busy, handingOver: reason == .handover, afterwards: afterwards)
    }
}
