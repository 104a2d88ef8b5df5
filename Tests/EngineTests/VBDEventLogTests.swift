import Synchronization
import Testing
import VBDInterface
import Xenbus

/// The event log behind GET /v1/events: numbering, filters, history replay, bounded queues.
struct VBDEventLogTests {
    static let vbd1 = VBDIdentity(kind: "vbd", domid: DomainID(rawValue: 1)!, devid: 51712)
    static let vbd2 = VBDIdentity(kind: "vbd3", domid: DomainID(rawValue: 2)!, devid: 51728)

    static func ids(_ next: VBDEventSubscription.Next) -> [UInt64] {
        if case .events(let events) = next { return events.map(\.id) }
        return []
    }

    @Test func eventsAreNumberedInOrderAndFiltered() {
        let log = VBDEventLog()
        let all = log.subscribe(after: nil, filter: VBDEventFilter(), capacity: 16) {}
        let domain2 = log.subscribe(after: nil, filter: VBDEventFilter(domid: DomainID(rawValue: 2)!), capacity: 16) {}
        let vbd3 = log.subscribe(after: nil, filter: VBDEventFilter(kind: "vbd3"), capacity: 16) {}
        log.publish(.added, Self.vbd1)
        log.publish(.added, Self.vbd2)
        log.publish(.backendState, Self.vbd1, [("state", .text("InitWait"))])
        #expect(Self.ids(all.next()) == [1, 2, 3])
        #expect(Self.ids(domain2.next()) == [2])
        #expect(Self.ids(vbd3.next()) == [2])
        if case .empty = all.next() {} else { Issue.record("a drained queue must be empty") }
        #expect(log.nextID == 4)
    }

    @Test func aReaderIsWokenWhenItsQueueStopsBeingEmpty() {
        let log = VBDEventLog()
        let wakes = Atomic<Int>(0)
        let reader = log.subscribe(after: nil, filter: VBDEventFilter(), capacity: 16) { wakes.add(1, ordering: .relaxed) }
        log.publish(.added, Self.vbd1)
        log.publish(.removed, Self.vbd1)
        // One wake-up for a queue that went from empty to not empty; the second event joins it.
        #expect(wakes.load(ordering: .relaxed) == 1)
        #expect(Self.ids(reader.next()) == [1, 2])
        log.publish(.added, Self.vbd1)
        #expect(wakes.load(ordering: .relaxed) == 2)
        log.unsubscribe(reader)
        log.publish(.removed, Self.vbd1)
        #expect(wakes.load(ordering: .relaxed) == 2)
        #expect(log.readerCount == 0)
    }

    @Test func aReaderThatComesBackGetsTheHistoryAfterItsLastID() {
        let log = VBDEventLog(historyCapacity: 8)
        for _ in 0..<5 { log.publish(.added, Self.vbd1) }
        let resumed = log.subscribe(after: 3, filter: VBDEventFilter(), capacity: 16) {}
        #expect(resumed.takeLost() == nil)
        #expect(Self.ids(resumed.next()) == [4, 5])
        // 20 events through a history of 8: ids 1...12 are gone.
        for _ in 0..<15 { log.publish(.added, Self.vbd1) }
        let late = log.subscribe(after: 2, filter: VBDEventFilter(), capacity: 16) {}
        #expect(late.takeLost() == .range(first: 3, last: 12))
        #expect(late.takeLost() == nil)
        #expect(Self.ids(late.next()) == Array(13...20))
        // An id this daemon never gave: a daemon before it; everything there is follows.
        let stranger = log.subscribe(after: 999, filter: VBDEventFilter(), capacity: 16) {}
        #expect(stranger.takeLost() == .unknownLastID(999))
        #expect(Self.ids(stranger.next()) == Array(13...20))
    }

    @Test func aReaderThatFallsBehindIsCutOffAndOthersKeepTheirEvents() {
        let log = VBDEventLog()
        let slow = log.subscribe(after: nil, filter: VBDEventFilter(), capacity: 4) {}
        let fast = log.subscribe(after: nil, filter: VBDEventFilter(), capacity: 4) {}
        for round in 0..<3 {
            for _ in 0..<3 { log.publish(.added, Self.vbd1) }
            #expect(Self.ids(fast.next()).count == 3, "round \(round)")
        }
        if case .cutOff = slow.next() {} else { Issue.record("a reader 9 events behind a queue of 4 must be cut off") }
        if case .cutOff = slow.next() {} else { Issue.record("a cut-off reader stays cut off") }
    }
}
