import Blkif
import Foundation
import Glibc
import Hypervisor
import SimHypervisor
import Xenbus

// Abuse of the xenbus side: state flips while connecting, ring descriptions naming grants or
// ports the backend cannot use, watch-event floods, and taking back a page the backend maps.

extension AttackSession {
    /// Brings the backend to InitWait with our side Initialising, whatever state it is in.
    func offerAgain() throws {
        _ = closeAndCountMappedGrants()
        try device.switchState(.initialising)
        try device.waitForBackend("InitWait", fail: { $0 == nil }) { $0 == .initWait }
    }

    /// Publishes a hand-made ring description and goes Initialised, as talk_to_blkback would.
    func publishRing(ringRef: String, eventChannel: String, extra: [(String, String)] = []) throws {
        let path = device.frontendPath
        try store.transaction { tx in
            for name in try store.directory(path, transaction: tx) ?? [] where RingDescription.isRingKey(name) {
                try store.remove("\(path)/\(name)", transaction: tx)
            }
            try store.write("\(path)/ring-ref", ringRef, transaction: tx)
            try store.write("\(path)/event-channel", eventChannel, transaction: tx)
            try store.write("\(path)/protocol", BlkifProtocol.native.xenstoreValue, transaction: tx)
            for (key, value) in extra { try store.write("\(path)/\(key)", value, transaction: tx) }
        }
        try device.switchState(.initialised)
    }

    /// The backend must refuse the ring description: Closing (xenbus_dev_fatal), never Connected.
    func expectConnectRefused(_ what: String) throws {
        do {
            try device.waitForBackend("Closing", fail: { $0 == .connected || $0 == nil }) { $0 == .closing || $0 == .closed }
        } catch let failure as FrontendFailure {
            throw AttackFailure("\(what): the backend must refuse it (Closing with an error node): \(failure)")
        }
        let reason = device.backendError().map { ": \($0)" } ?? " (error node not readable by the guest)"
        log("\(what): refused\(reason)")
        try device.switchState(.closed)
        try device.waitForBackend("Closed", fail: { $0 == nil }) { $0 == .closed }
    }

    /// Ends foreign access of `granted`, waiting for the backend to let go; fails when it keeps them.
    func expectReleased(_ granted: [GrantedPage], _ what: String) throws {
        pages.release(granted)
        let deadline = Date().addingTimeInterval(options.answerTimeout)
        while pages.retryBusy() > 0 {
            guard Date() < deadline else {
                throw AttackFailure("\(what): the backend still maps \(pages.busy.count) page(s) of a refused ring")
            }
            usleep(50_000)
        }
    }
}

extension Attack {
    static let stateFlapping = Attack.onConnectedDevice(
        name: "state-flapping",
        summary: "XSA-350: flip the frontend state among Initialising/Initialised/Connected/Closing/Closed (and values that are no state) hundreds of times while connecting, then with the ring full of reads → no crash, every ring and data mapping released, a clean negotiation works afterwards",
        stillServed: "after the state flips"
    ) { s in
        let states: [XenbusState] = [.initialised, .connected, .closing, .closed, .initialising]
        var generator = SystemRandomNumberGenerator()
        let flips = 600
        // Now and then a value that is no state at all.
        let garbage = ["99999999999999999999999", "-1", "", "4 junk", "7", "\u{1}"]
        for flip in 0..<flips {
            if flip % 50 == 49 {
                try s.store.write("\(s.device.frontendPath)/state", garbage[(flip / 50) % garbage.count])
            } else {
                try s.device.switchState(states.randomElement(using: &generator)!)
            }
            // Some flips back to back, some spread out so the backend is caught mid-step.
            if flip % 3 == 0 { usleep(UInt32.random(in: 0...3000, using: &generator)) }
        }
        try s.device.switchState(.connected)
        usleep(200_000)
        let left = s.closeAndCountMappedGrants()
        guard left == 0 else {
            throw AttackFailure("after \(flips) state flips and a close, the backend still maps \(left) ring page(s) (leaked mapping)")
        }
        s.log("\(flips) state flips; after closing, every ring page came back; backend \(try s.device.backendState()?.description ?? "gone")")

        // The same with the ring full of large reads: the flips land while they are in flight.
        try s.connect()
        let queue = try s.queue
        var data: [GrantedPage] = []
        while queue.ring.freeRequestSlots > 0 {
            let pages = try s.grant(Blkif.maxSegmentsPerRequest)
            data += pages
            _ = queue.ring.putRequest(s.readWrite(.read, sector: 0, pages: pages))
        }
        _ = queue.ring.pushRequestsAndCheckNotify()
        try s.device.eventChannels.notify(queue.port)
        for state in [XenbusState.closing, .closed, .initialising, .initialised, .connected, .closed, .initialised] {
            try s.device.switchState(state)
        }
        s.release(data)  // pages the backend still maps wait aside until it lets go
        usleep(200_000)
        let stillMapped = s.closeAndCountMappedGrants()
        guard stillMapped == 0 else {
            throw AttackFailure("after state flips with \(queue.ring.shared.size) reads in flight, the backend still maps \(stillMapped) page(s)")
        }
        s.log("state flips with \(queue.ring.shared.size) reads in flight: every data and ring page came back")
    }

    static let badRingRef = Attack(
        name: "bad-ring-ref",
        summary: "ring-ref never granted, granted to another domain, granted read-only, or not a number; impossible queue count, ring page order or protocol → the backend goes Closing with an error node, never Connected, maps nothing"
    ) { s in
        try s.offerAgain()
        let port = try s.device.eventChannels.allocUnbound(remoteDomain: s.backendId)
        defer { try? s.device.eventChannels.unbind(port) }
        let stranger = try s.pages.grant(1, to: strangerDomain, readOnly: false)
        let readOnly = try s.pages.grant(1, to: s.backendId, readOnly: true)
        let cases: [(String, String)] = [("a ring-ref never granted", "\(try s.neverGrantedRef())"),
                                         ("a ring-ref granted to domain \(strangerDomain)", "\(stranger[0].ref)"),
                                         ("a ring-ref granted read-only", "\(readOnly[0].ref)"),
                                         ("a ring-ref beyond the grant table", "4294967295"),
                                         ("a ring-ref that is no number", "12abc")]
        for (index, (what, ref)) in cases.enumerated() {
            if index > 0 { try s.offerAgain() }
            try s.publishRing(ringRef: ref, eventChannel: "\(port)")
            try s.expectConnectRefused(what)
        }
        // A good ring page described impossibly: the backend must not map it at all.
        let ring = try s.pages.grantContiguous(1, to: s.backendId)
        let shapes: [(String, [(String, String)])] = [
            ("multi-queue-num-queues 4096", [("multi-queue-num-queues", "4096")]),
            ("ring-page-order 9 (above max-ring-page-order)", [("ring-page-order", "9")]),
            ("ring-page-order 1 without ring-ref0/ring-ref1", [("ring-page-order", "1")]),
            ("protocol x86_16-abi", [("protocol", "x86_16-abi")]),
            ("a two-page ring whose second page was never granted",
             [("ring-page-order", "1"), ("ring-ref0", "\(ring[0].ref)"), ("ring-ref1", "\(try s.neverGrantedRef())")]),
        ]
        for (what, extra) in shapes {
            try s.offerAgain()
            try s.publishRing(ringRef: "\(ring[0].ref)", eventChannel: "\(port)", extra: extra)
            try s.expectConnectRefused(what)
        }
        for key in ["multi-queue-num-queues", "ring-page-order"] { try? s.store.remove("\(s.device.frontendPath)/\(key)") }
        try s.expectReleased(stranger + readOnly + ring, "bad ring descriptions")
        try s.verifyStillServed()
    }

    static let badEventChannel = Attack(
        name: "bad-event-channel",
        summary: "event-channel never allocated, allocated for another domain, or not a number (with a good ring page) → Closing with an error node, the ring page unmapped again"
    ) { s in
        try s.offerAgain()
        let ownPort = try s.device.eventChannels.allocUnbound(remoteDomain: s.options.domid)
        defer { try? s.device.eventChannels.unbind(ownPort) }
        let cases: [(String, String)] = [("an event channel never allocated", "4000"),
                                         ("an event channel reserved for the guest itself", "\(ownPort)"),
                                         ("an event channel beyond 32 bits", "99999999999"),
                                         ("an event channel that is no number", "-1")]
        for (index, (what, port)) in cases.enumerated() {
            if index > 0 { try s.offerAgain() }
            let ring = try s.pages.grantContiguous(1, to: s.backendId)
            try s.publishRing(ringRef: "\(ring[0].ref)", eventChannel: port)
            try s.expectConnectRefused(what)
            try s.expectReleased(ring, what)
        }
        try s.verifyStillServed()
    }

    static let xenstoreFlood = Attack.onConnectedDevice(
        name: "xenstore-flood",
        summary: "XSA-349: rewrite the watched state node and its children, and pile up watches, for --seconds → reads meanwhile answered, the device stays Connected"
    ) { s in
        let path = s.device.frontendPath
        var watches: [String] = []
        for index in 0..<100 {
            let watched = "\(path)/flood-watch-\(index)"
            try s.store.watch(watched, token: "flood-\(index)")
            watches.append(watched)
        }
        let data = try s.grant(1)
        var writes = 0, reads = 0
        let start = Date()
        while Date().timeIntervalSince(start) < s.options.seconds {
            // Each write fires the backend's watch on <frontend>/state (children included).
            try s.store.write("\(path)/state", "\(XenbusState.connected.rawValue)")
            try s.store.write("\(path)/state/flood-\(writes % 200)", "\(writes)")
            try s.store.write("\(path)/flood-watch-\(writes % 100)", "\(writes)")
            writes += 3
            _ = s.store.pendingWatchEvents()
            if writes % 150 == 0 {
                try s.expect(s.readWrite(.read, sector: 0, pages: data), [.okay], "READ during the flood")
                reads += 1
            }
        }
        for index in 0..<200 { try? s.store.remove("\(path)/state/flood-\(index)") }
        for (index, watched) in watches.enumerated() {
            try? s.store.unwatch(watched, token: "flood-\(index)")
            try? s.store.remove(watched)
        }
        _ = s.store.pendingWatchEvents()
        guard try s.device.backendState() == .connected else {
            throw AttackFailure("the flood of watch events took the device out of Connected (\(try s.device.backendState()?.description ?? "gone"))")
        }
        s.log("\(writes) xenstore writes in \(String(format: "%.1f", Date().timeIntervalSince(start))) s; \(reads) reads answered meanwhile")
        s.release(data)
    }

    static let unmapBusy = Attack.onConnectedDevice(
        name: "unmap-busy",
        summary: "end foreign access of the ring page while the backend maps it → refused (GTF_reading/GTF_writing), the ring keeps working"
    ) { s in
        let ring = try s.queue.ringPages[0]
        do {
            try s.pages.grants.endForeignAccess(ring.ref)
            throw AttackFailure("the guest took back ring page \(ring.ref) while the backend maps it")
        } catch SimDomainError.grantBusy {
            s.log("ending foreign access of the mapped ring page was refused")
        }
        let data = try s.grant(1)
        try s.expect(s.readWrite(.read, sector: 0, pages: data), [.okay], "READ on the ring after the refused revocation")
        s.release(data)
    }
}
