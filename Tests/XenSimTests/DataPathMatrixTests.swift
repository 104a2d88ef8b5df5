import Engine
import Foundation
import Testing
import XenSim

/// Every shape of ring a frontend can negotiate, verified end to end through the control
/// plane and the data plane: protocol × queues × ring order × persistent grants × indirect
/// segments × how pages not kept mapped travel (mapped per request, or grant copy with a
/// persistent limit small enough to overflow), each writing, flushing and reading back
/// stamped sectors.
@Suite struct DataPathMatrixTests {
    struct Shape: CustomTestStringConvertible {
        var queues: Int
        var ringPageOrder: Int
        var persistent: Bool
        var indirect: Bool
        var testDescription: String {
            "\(queues) queue(s), order \(ringPageOrder), persistent \(persistent ? "on" : "off"), indirect \(indirect ? "on" : "off")"
        }
    }

    static let shapes: [Shape] = [1, 2].flatMap { queues in
        [0, 4].flatMap { order in
            [true, false].flatMap { persistent in
                [true, false].map { Shape(queues: queues, ringPageOrder: order, persistent: persistent, indirect: $0) }
            }
        }
    }

    @Test(arguments: [BlkifProtocol.native, .x86_32, .x86_64], [BlkbackDataPlane.IOPolicy.auto, .directCopy])
    func everyRingShapeVerifiesItsData(_ abi: BlkifProtocol, _ policy: BlkbackDataPlane.IOPolicy) throws {
        var configuration = BackendConfiguration()
        if policy == .directCopy { configuration.maxPersistentGrants = 64 }
        try BackendRig.run(configuration: configuration, ioPolicy: policy) { rig in
            try rig.attach()
            for shape in Self.shapes {
                var options = BlockfrontOptions()
                options.protocol = abi
                options.queues = shape.queues
                options.ringPageOrder = shape.ringPageOrder
                options.persistentGrants = shape.persistent
                options.indirect = shape.indirect
                // Indirect requests need more than 11 segments: 64 KiB is 16 pages.
                var workload = WorkloadConfiguration(kind: .verify, blockSize: shape.indirect ? 65536 : 4096, queueDepth: 16)
                workload.bytes = 2 << 20
                let log = MessageLog()
                let run = try FrontendRun(device: try rig.frontend(options: options),
                                          configuration: FrontendConfiguration(workload: workload), log: log.append)
                // The manager publishes its snapshots after it handled the frontend's Connected.
                #expect(rig.waitForSnapshots { $0.first?.frontendState == .connected && $0.first?.ioMode != nil })
                let snapshot = try #require(rig.onlySnapshot)
                #expect(snapshot.persistentGrants == shape.persistent, "\(shape.testDescription)")
                #expect(snapshot.ioMode == (shape.persistent ? .directPersistent : policy == .auto ? .directMap : .directCopy))
                var persistentSeen: UInt64 = 0
                let report = run.run {
                    persistentSeen = max(persistentSeen, rig.manager.snapshots().first?.statistics?.persistentGrants ?? 0)
                    return false
                }
                #expect(report.succeeded && report.reads > 0 && report.writes > 0,
                        "\(abi) \(shape.testDescription): \(report.error ?? "") \(log.messages.suffix(5))")
                let negotiated = try #require(report.negotiated)
                #expect(negotiated.queues == shape.queues && negotiated.ringPageOrder == shape.ringPageOrder)
                #expect(negotiated.persistentGrants == shape.persistent)
                #expect((negotiated.indirectSegments > 0) == shape.indirect)
                #expect((persistentSeen > 0) == shape.persistent, "\(shape.testDescription): \(persistentSeen) persistent grants seen")
                #expect(report.grantsStillMapped == 0)
                #expect(try rig.grantsMappedByBackend() == 0, "\(shape.testDescription): grants left mapped after close")
            }
        }
    }
}
