import Blkif
import Foundation
import Glibc
import VBDInterface
import Xenbus

/// The frontend's states (frontend_changed) and connecting (connect_ring, connect).
extension VBD {
    func frontendStateChanged() -> Outcome {
        do {
            let reading = FrontendStateReading(node: try store.read(frontendPath + "/state"))
            if reading != frontendState {
                let (allowed, suppressed) = frontendLogBudget.take(now: DispatchTime.now().uptimeNanoseconds)
                if suppressed > 0 {
                    logger.warning("\(suppressed) frontend state changes not logged (more than \(frontendLogBudget.limit) in 10 s)")
                }
                if allowed {
                    logger.info("frontend \(frontendState) → \(reading) (backend \(backendState))")
                } else {
                    logger.debug("frontend \(frontendState) → \(reading) (backend \(backendState))")
                }
                context.events.publish(.frontendState, identity, [("state", .text(reading.description)),
                                                                 ("previous", .text(frontendState.description))])
            } else if reading.state == .closed, backendState == .initWait {
                // A frontend that was already Closed when we offered the device (a guest
                // waiting across a daemon restart) is not a new close: keep offering it;
                // blkfront connects from Closed when it sees InitWait.
                return .keep
            } else if reading.state == .initialising, backendState == .closed {
                // Nor is an unchanged Initialising a frontend starting over (that one passes
                // through Closed first): it is the watch's first event arriving after an
                // operator closed the device, which must stay closed.
                return .keep
            }
            frontendState = reading
            return try follow(frontendChanged(backend: backendState, frontend: reading, online: try isOnline()))
        } catch {
            logger.warning("handling the frontend state failed: \(error)")
        }
        return .keep
    }

    /// Once a deferred Closed is written (the rings are released), the frontend may have moved
    /// on meanwhile (a guest starting over): do what its state asks of a Closed backend now.
    func followFrontendAfterDeferredClose() -> Outcome {
        do {
            frontendState = FrontendStateReading(node: try store.read(frontendPath + "/state"))
            return try follow(frontendChanged(backend: backendState, frontend: frontendState, online: try isOnline()))
        } catch {
            logger.warning("handling the frontend state after the close failed: \(error)")
            return .keep
        }
    }

    /// Carries out the state table's actions.
    private func follow(_ actions: [FrontendChangeAction]) throws -> Outcome {
        for action in actions {
            switch action {
            case .switchState(.closed) where rings.disconnectPending:
                // Mappings remain: Closed follows once the rings are released, and then
                // whatever the frontend asks by that time.
                rings.closeWhenReleased = true
                rings.followFrontendAfterClose = true
            case .switchState(let state):
                try switchState(state)
            case .disconnect:
                // Connecting over rings still in use would leak them (XSA-350).
                if !disconnect(), actions.contains(.connect) {
                    fatal(EBUSY, "pending I/O")
                    return .keep
                }
            case .connect:
                connectRing()
            case .unregister:
                return .unregister
            case .fatal(let errno, let message):
                fatal(errno, message)
            }
        }
        return .keep
    }

    /// connect_ring: read and validate the frontend's ring description.
    private func connectRing() {
        do {
            let description = try readRingDescription()
            rings.description = description
            logger.info("using \(description.queues.count) queues, protocol \(description.protocol), ring page order \(description.ringPageOrder)")
            tryConnect()
        } catch {
            fatal(error, during: "reading the ring description")
        }
    }

    /// The frontend's ring keys, checked against what we offer.
    func readRingDescription() throws -> RingDescription {
        try RingDescription.read(limits: ringLimits) { key in try store.read(frontendPath + "/" + key) }
    }

    /// xen_update_blkif_status: connect once both the rings and the backing store are there.
    func tryConnect() {
        guard backendState != .connected, let description = rings.description, let backingStore = disk.store else { return }
        guard let dataPlane = context.dataPlane, let prepared = disk.prepared else {
            logger.info("data plane not available; staying in InitWait")
            return
        }
        // The size now: the store may have grown or shrunk since it was opened.
        if let now = try? backingStore.currentSectors() { disk.sectors = now }
        let connected: any ConnectedRings
        do {
            connected = try dataPlane.connect(dataPlaneRequest(backingStore, prepared, description))
        } catch {
            fatal(EIO, "mapping rings: \(error)")
            return
        }
        rings.connection = connected
        rings.features = connected.features
        haltReported = false
        do {
            try publishDisk(backingStore, features: connected.features)
            try switchState(.connected)
            publishConnected(description, connected, backingStore)
        } catch {
            fatal(error, during: "publishing the disk", fallback: EIO)
            _ = disconnect()
        }
    }

    /// What the data plane needs to serve `description`'s rings on `backingStore`, with the
    /// QoS limits the backend's qos-* keys hold now.
    func dataPlaneRequest(_ backingStore: BackingStore, _ prepared: any PreparedStore,
                          _ description: RingDescription) -> DataPlaneRequest {
        let (limits, ignored) = (try? QoSLimits.read { try backend($0) }) ?? (.none, [])
        if !ignored.isEmpty { logger.warning("ignoring \(ignored.joined(separator: ", ")): not a number within its range") }
        qos = limits
        var request = DataPlaneRequest(vbd: identity, backingStore: backingStore, prepared: prepared, rings: description,
                                       maxIndirectSegments: context.configuration.maxIndirectSegments,
                                       discardEnabled: XenbusValue.flag(try? backend("discard-enable"), default: true),
                                       maxPersistentGrants: context.configuration.maxPersistentGrants, qos: limits)
        request.sectors = disk.sectors
        request.events = VBDEventReporter(vbd: identity, log: context.events)
        return request
    }

    /// vbd_resize: when the store's size changed (a file or device grown or shrunk), the new
    /// `sectors` and the state (Connected, again) are written in one transaction, which makes
    /// a connected frontend read the size again, and the rings check requests against it at
    /// once. Returns whether the size changed.
    @discardableResult
    func checkSize() throws -> Bool {
        guard let backing = disk.store else { return false }
        let now: UInt64
        do { now = try backing.currentSectors() } catch { throw XenbusFailure(errno: error.errno, message: error.message) }
        guard now != disk.sectors else { return false }
        logger.info("VBD resize: \(disk.sectors) → \(now) sectors")
        context.events.publish(.resized, identity, [("sectors", .number(now)), ("previous_sectors", .number(disk.sectors))])
        disk.sectors = now
        rings.connection?.resize(sectors: now)
        guard backendState == .connected else { return true }
        try store.transaction { transaction in
            guard try store.read(backendPath + "/state", transaction: transaction) != nil else { return }
            try store.write(backendPath + "/sectors", "\(now)", transaction: transaction)
            try store.write(backendPath + "/state", "\(backendState.rawValue)", transaction: transaction)
        }
        return true
    }

    /// A ring the data plane stopped serving leaves the device Connected (its other rings go
    /// on, as Linux blkback leaves a ring it stopped), but the toolstack and the operator are
    /// told: the error node (EPROTO and the reason) and the VBD's `error` in the API, once per
    /// connection.
    func reportHalt() {
        guard !haltReported, let reason = rings.connection?.haltReason else { return }
        haltReported = true
        let line = "\(EPROTO) ring halted: \(reason)"
        lastError = line
        logger.error("\(line)")
        do {
            try store.write("\(context.configuration.domainPath)/error/\(nodename)/error", line)
        } catch {
            logger.warning("writing the error node failed: \(error)")
        }
    }

    /// The `connected` event: what both ends agreed on.
    func publishConnected(_ description: RingDescription, _ connected: any ConnectedRings, _ backingStore: BackingStore) {
        context.events.publish(.connected, identity, [
            ("protocol", .text("\(description.protocol)")),
            ("queues", .number(UInt64(description.queues.count))),
            ("ring_page_order", .number(UInt64(description.ringPageOrder))),
            ("persistent_grants", .flag(connected.features.persistentGrants)),
            ("io_mode", .text(connected.ioMode.rawValue)),
            ("sectors", .number(disk.sectors)),
            ("sector_size", .number(UInt64(backingStore.logicalSectorSize))),
            ("discard", .flag(connected.features.discard)),
        ])
    }

    /// connect(): what the frontend needs to know about the disk, in one transaction.
    private func publishDisk(_ backingStore: BackingStore, features: BlockFeatures) throws {
        var keys: [(String, String)] = [
            ("feature-flush-cache", features.flush ? "1" : "0"),
            ("feature-barrier", features.barrier ? "1" : "0"),
            ("feature-discard", features.discard ? "1" : "0"),
            // The offer, as Linux blkback publishes it: used only where the frontend offered too.
            ("feature-persistent", context.configuration.persistentGrants ? "1" : "0"),
            ("sectors", "\(disk.sectors)"),
            ("info", "\(disk.info.rawValue)"),
            ("sector-size", "\(backingStore.logicalSectorSize)"),
            ("physical-sector-size", "\(backingStore.physicalSectorSize)"),
        ]
        if features.discard {
            keys += [("discard-granularity", "\(features.discardGranularity)"),
                     ("discard-alignment", "\(features.discardAlignment)"),
                     ("discard-secure", features.discardSecure ? "1" : "0")]
        }
        try store.transaction { transaction in
            guard try store.read(backendPath + "/state", transaction: transaction) != nil else { return }
            for (key, value) in keys { try store.write(backendPath + "/" + key, value, transaction: transaction) }
        }
    }
}
