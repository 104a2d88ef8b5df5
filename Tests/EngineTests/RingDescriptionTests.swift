@testable import Blkif
@testable import ControlPlane
import Engine
import Glibc
import Testing

@Suite struct RingDescriptionTests {
    let configuration = BackendConfiguration(maxQueues: 4, maxRingPageOrder: 2, persistentGrants: true)

    func read(_ keys: [String: String], _ configuration: BackendConfiguration? = nil) throws -> RingDescription {
        try RingDescription.read(limits: (configuration ?? self.configuration).ringLimits, keys: keys)
    }

    func refusal(_ keys: [String: String]) -> XenbusFailure? {
        do {
            _ = try read(keys)
            return nil
        } catch {
            return error as? XenbusFailure
        }
    }

    @Test func singlePageSingleQueue() throws {
        let ring = try read(["ring-ref": "8", "event-channel": "15", "protocol": "x86_64-abi", "feature-persistent": "1"])
        #expect(ring.queues == [RingQueue(ringRefs: [8], eventChannel: 15)])
        #expect(ring.ringPageOrder == 0)
        #expect(ring.persistentGrants)
        #expect(ring.protocol == .x86_64)
    }

    @Test func missingProtocolIsNative() throws {
        #expect(try read(["ring-ref": "1", "event-channel": "2"]).protocol == .native)
        #expect(try read(["ring-ref": "1", "event-channel": "2", "protocol": ""]).protocol == .native)
    }

    @Test func x86_32ProtocolIsRecognised() throws {
        #expect(try read(["ring-ref": "1", "event-channel": "2", "protocol": "x86_32-abi"]).protocol == .x86_32)
    }

    @Test func unknownProtocolIsRefused() {
        let error = refusal(["ring-ref": "1", "event-channel": "2", "protocol": "sparc-abi"])
        #expect(error == XenbusFailure(errno: ENOSYS, message: "unknown fe protocol sparc-abi"))
    }

    @Test func persistentGrantsNeedBothSides() throws {
        let keys = ["ring-ref": "1", "event-channel": "2", "feature-persistent": "1"]
        #expect(try read(keys).persistentGrants)
        var without = configuration
        without.persistentGrants = false
        #expect(try !read(keys, without).persistentGrants)
        #expect(try !read(["ring-ref": "1", "event-channel": "2"]).persistentGrants)
        #expect(try !read(["ring-ref": "1", "event-channel": "2", "feature-persistent": "0"]).persistentGrants)
    }

    @Test func multiPageReadsNumberedRefs() throws {
        let ring = try read(["ring-page-order": "2", "ring-ref0": "10", "ring-ref1": "11", "ring-ref2": "12",
                             "ring-ref3": "13", "event-channel": "5", "ring-ref": "99"])
        #expect(ring.ringPageOrder == 2)
        #expect(ring.queues == [RingQueue(ringRefs: [10, 11, 12, 13], eventChannel: 5)])
    }

    @Test func orderZeroStillUsesNumberedRefs() throws {
        #expect(try read(["ring-page-order": "0", "ring-ref0": "7", "event-channel": "5"]).queues
                == [RingQueue(ringRefs: [7], eventChannel: 5)])
        #expect(refusal(["ring-page-order": "0", "ring-ref": "7", "event-channel": "5"])?.message == "reading ring-ref0: missing")
    }

    @Test func orderAboveTheAdvertisedMaximumIsRefused() {
        let error = refusal(["ring-page-order": "3", "event-channel": "5"])
        #expect(error == XenbusFailure(errno: EINVAL, message: "requested ring page order 3 exceed max:2"))
    }

    @Test func missingNumberedRefIsRefused() {
        #expect(refusal(["ring-page-order": "1", "ring-ref0": "10", "event-channel": "5"])?.message == "reading ring-ref1: missing")
    }

    @Test func multiQueueReadsEachQueueDirectory() throws {
        let ring = try read(["multi-queue-num-queues": "2", "ring-page-order": "1",
                             "queue-0/ring-ref0": "1", "queue-0/ring-ref1": "2", "queue-0/event-channel": "3",
                             "queue-1/ring-ref0": "4", "queue-1/ring-ref1": "5", "queue-1/event-channel": "6"])
        #expect(ring.queues == [RingQueue(ringRefs: [1, 2], eventChannel: 3), RingQueue(ringRefs: [4, 5], eventChannel: 6)])
    }

    @Test func oneQueueUsesTheTopLevelKeys() throws {
        let ring = try read(["multi-queue-num-queues": "1", "ring-ref": "8", "event-channel": "9",
                             "queue-0/ring-ref": "1", "queue-0/event-channel": "2"])
        #expect(ring.queues == [RingQueue(ringRefs: [8], eventChannel: 9)])
    }

    @Test(arguments: ["0", "5", "4294967297"])
    func queueCountOutsideOneToMaxIsRefused(count: String) {
        let error = refusal(["multi-queue-num-queues": count, "ring-ref": "1", "event-channel": "2"])
        if count == "4294967297" {
            #expect(error?.errno == ENOSYS)
        } else {
            #expect(error == XenbusFailure(errno: ENOSYS, message: "guest requested \(count) queues, exceeding the maximum of 4."))
        }
    }

    @Test func missingQueueKeysAreRefused() {
        #expect(refusal(["multi-queue-num-queues": "2", "queue-0/ring-ref": "1", "queue-0/event-channel": "2",
                         "queue-1/ring-ref": "3"])?.message == "reading queue-1/event-channel: missing")
        #expect(refusal(["ring-ref": "1"])?.message == "reading event-channel: missing")
        #expect(refusal(["event-channel": "1"])?.message == "reading ring-ref: missing")
    }

    @Test(arguments: ["-1", "12abc", "0x10", "", "4294967296", "99999999999999999999999"])
    func malformedNumbersAreRefused(value: String) {
        #expect(refusal(["ring-ref": value, "event-channel": "2"])?.errno == EINVAL)
        #expect(refusal(["ring-ref": "1", "event-channel": value])?.errno == EINVAL)
    }

    @Test func malformedCountsAreRefused() {
        #expect(refusal(["ring-page-order": "two", "event-channel": "1"])?.errno == EINVAL)
        #expect(refusal(["multi-queue-num-queues": "x", "ring-ref": "1", "event-channel": "2"])?.errno == EINVAL)
    }

    @Test func hostileTextIsSanitizedInMessages() {
        let error = refusal(["ring-ref": "\u{1b}[31m" + String(repeating: "A", count: 500), "event-channel": "2"])
        #expect(error?.message.contains("\u{1b}") == false)
        #expect((error?.message.count ?? 1000) < 150)
    }

    @Test func readsOnlyTheKeysItNeeds() throws {
        var asked: [String] = []
        _ = try RingDescription.read(limits: configuration.ringLimits) { key in
            asked.append(key)
            return ["ring-ref": "1", "event-channel": "2"][key]
        }
        #expect(Set(asked) == ["protocol", "feature-persistent", "multi-queue-num-queues", "ring-page-order", "event-channel", "ring-ref"])
    }
}
