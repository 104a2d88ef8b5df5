import Blkif
import Foundation
import Glibc
import Xenbus

// Abuse that is legal one request or one state change at a time, hostile only in bulk: a ring
// full of barriers, a guest that renegotiates without end, and one guest with many disks.

extension Attack {
    static let barrierStream = Attack.onConnectedDevice(
        name: "barrier-stream",
        summary: "a full ring of WRITE_BARRIERs (with and without data) again and again for --seconds → each answered (okay, or not-supported when not offered)"
    ) { s in
        let offered = try s.store.read("\(s.device.backendPath)/feature-barrier") == "1"
        let expected: BlkifResponseStatus = offered ? .okay : .notSupported
        let data = try s.grant(1)
        defer { s.release(data) }
        let queue = try s.queue
        let start = Date()
        var answered = 0
        while Date().timeIntervalSince(start) < s.options.seconds {
            // As many as the ring holds, every other one carrying a page of data.
            var ids: [UInt64] = []
            while queue.ring.freeRequestSlots > 0 {
                var request = s.readWrite(.writeBarrier, sector: UInt64(ids.count) * 8, pages: ids.count % 2 == 0 ? data : [])
                if case .readWrite(var barrier) = request, ids.count % 2 == 1 {
                    barrier.sectorNumber = .max  // blkfront's sector for a barrier without data
                    request = .readWrite(barrier)
                }
                guard queue.ring.putRequest(request) else { break }
                ids.append(request.id)
            }
            _ = queue.ring.pushRequestsAndCheckNotify()
            try s.device.eventChannels.notify(queue.port)
            for id in ids {
                guard let response = try s.awaitResponse(id) else {
                    throw AttackFailure("barrier \(answered + 1) got no answer within \(s.options.answerTimeout) s")
                }
                guard response.status == expected else {
                    throw AttackFailure("a barrier was answered \(response.status), not \(expected) (feature-barrier=\(offered ? 1 : 0))")
                }
                answered += 1
            }
        }
        s.log(String(format: "%d barriers answered %@ in %.1f s", answered, "\(expected)", Date().timeIntervalSince(start)))
    }

    static let reconnectLoop = Attack.onConnectedDevice(
        name: "reconnect-loop",
        summary: "close and renegotiate the device without pause for --seconds (a new ring each time) → every negotiation Connected, no grant left mapped"
    ) { s in
        let start = Date()
        var cycles = 0
        while Date().timeIntervalSince(start) < s.options.seconds {
            let left = s.closeAndCountMappedGrants()
            guard left == 0 else {
                throw AttackFailure("after reconnect \(cycles): the backend still maps \(left) page(s) of a closed ring")
            }
            do {
                try s.connect()
            } catch {
                throw AttackFailure("reconnect \(cycles + 1) did not reach Connected: \(error)")
            }
            cycles += 1
        }
        s.log(String(format: "%d reconnects in %.1f s", cycles, Date().timeIntervalSince(start)))
    }

    static let manyVBDs = Attack(
        name: "many-vbds",
        summary: "connect every disk the guest has (--queues, --ring-page-order each) and storm all their rings with notifications and reads for --seconds → each still served"
    ) { s in
        let devices = try s.store.directory("/local/domain/\(s.options.domid)/device/\(s.options.kind)") ?? []
        var sessions: [AttackSession] = []
        for devid in devices.compactMap({ UInt32($0) }).sorted() {
            var options = s.options
            options.devid = devid
            // Each disk through its own xenstore connection, as each blkfront instance
            // watches its own backend.
            let session = try AttackSession(options: options, store: try XenStore(), log: s.log, pages: s.pages)
            try session.connect()
            sessions.append(session)
        }
        guard sessions.count > 1 else { throw FrontendFailure("many-vbds needs several disks attached to domain \(s.options.domid)") }
        let rings = sessions.reduce(0) { $0 + $1.queues.count }
        s.log("\(sessions.count) disks connected, \(rings) rings")
        let stop = StopFlag()
        let storms = sessions.map { session in
            let channels = session.device.eventChannels
            let ports = session.queues.map(\.port)
            return startThread("storm-\(session.options.devid)") {
                while !stop.isSet {
                    for port in ports { try? channels.notify(port) }
                }
            }
        }
        defer {
            stop.set()
            for finished in storms { finished.wait() }
        }
        let start = Date()
        var reads = 0
        while Date().timeIntervalSince(start) < s.options.seconds {
            for session in sessions {
                _ = try session.readBack(sector: UInt64(reads % 64) * 8, count: 1, "a READ of disk \(session.options.devid) during the storm")
                reads += 1
            }
        }
        stop.set()
        for session in sessions { try session.verifyStillServed("disk \(session.options.devid) after the storm") }
        s.log("\(reads) reads answered across \(sessions.count) disks during the storm")
    }
}
