import Foundation
import Hypervisor
import SimHypervisor
import Xenbus

/// One way a malicious guest abuses its block device, and what the backend must do about it.
/// `run` throws AttackFailure when the backend misbehaved, FrontendFailure (or any other
/// error) when the attack could not even be set up.
public struct Attack: Sendable {
    public let name: String
    public let summary: String
    let body: @Sendable (AttackSession) throws -> Void

    /// Most valuable first, as in the hardening history of Linux blkback.
    public static let all: [Attack] = [
        readIntoReadOnlyGrant, badGrantRef, zeroSegments, tooManySegments, badSegmentSectors, sectorOutOfRange,
        unknownOperation, writeOnReadOnlyDevice, ringIndexOverflow, indirectAbuse, doubleFetch, stateFlapping,
        badRingRef, badEventChannel, eventStorm, xenstoreFlood, unmapBusy,
        duplicateGrantRefs, dataRefIsRingRef, persistentGrantOverflow, persistentFlip,
        barrierStream, reconnectLoop, manyVBDs,
    ]

    public static func named(_ name: String) -> Attack? { all.first { $0.name == name } }

    /// An attack on a connected device: the session connects first, and afterwards the
    /// device must still serve a verified write and read-back (the backend survived it);
    /// `stillServed` names the moment in the failure line.
    static func onConnectedDevice(name: String, summary: String, stillServed: String = "after the attack",
                                  _ body: @escaping @Sendable (AttackSession) throws -> Void) -> Attack {
        Attack(name: name, summary: summary) { s in
            try s.connect()
            try body(s)
            try s.verifyStillServed(stillServed)
        }
    }

    /// Connects as domain `options.domid` through `store` (its own xenstore connection) and
    /// carries the attack out.
    public func run(options: AttackOptions, store: XenStore, log: @escaping (String) -> Void) throws {
        let session = try AttackSession(options: options, store: store, log: log, pages: nil)
        try body(session)
    }
}
