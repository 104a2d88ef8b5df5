@testable import Blkif
@testable import DataPlane
import Foundation
import Testing

/// What a daemon that takes a ring over reads from its predecessor's journal.
@Suite struct RingJournalTests {
    static let identity = "vbd/1/51712 ring 0"

    /// One request stays in flight while far more than a ring's worth of later ones are
    /// taken and answered (answers come out of order: a slow flush, a network store that
    /// stalls); the predecessor dies. The successor must serve that request again, and
    /// nothing else.
    @Test func aRequestOlderThanARingsWorthIsStillOwed() throws {
        var pair = RingPair()
        let path = NSTemporaryDirectory() + "/blkback-journal-\(UUID().uuidString)"
        defer { unlink(path) }
        func read(_ id: UInt64) -> BlkifRequest {
            .readWrite(.init(operation: .read, handle: 0, id: id, sectorNumber: id * 8,
                             segments: segments([BlkifSegment(gref: 8, firstSect: 0, lastSect: 7)])))
        }
        let later = 3 * Int(pair.shared.size)
        // The predecessor's life: it returns (its journal closed, its lock gone) as a dying
        // process would leave it.
        func predecessor() throws -> BlkifRequest {
            let journal = try RingJournal(path: path, identity: Self.identity, ringSize: pair.shared.size, layout: pair.shared.layout)
            journal.start(identity: Self.identity, at: 0)
            // Request 0 is taken and stays unanswered.
            let slow = try #require(try pair.send(read(0)))
            _ = journal.taken(slow, at: 0)
            // 3 × ring-size more, each taken, answered and published.
            for id in 1...later {
                let request = try #require(try pair.send(read(UInt64(id))))
                let slot = journal.taken(request, at: RingIndex(id))
                journal.answered(slot, at: pair.back.responseProducerPrivate, status: .okay)
                _ = try pair.answer(BlkifResponse(answering: request, status: .okay))
                journal.published(pair.back.responseProducerPrivate)
            }
            return slow
        }
        let slow = try predecessor()

        let successor = try RingJournal(path: path, identity: Self.identity, ringSize: pair.shared.size, layout: pair.shared.layout)
        let recovery = try successor.recover(identity: Self.identity, ring: pair.shared)
        #expect(recovery.requestConsumer == RingIndex(later + 1))
        #expect(recovery.unpublished.isEmpty)
        #expect(recovery.unanswered.map(\.ringIndex) == [0])
        #expect(recovery.unanswered.first?.request == slow)
    }
}
