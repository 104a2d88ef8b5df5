import Engine
import SimHypervisor
import Testing
@testable import XenSim

/// Drives `Xenstored` directly: connections are ids, requests are wire messages.
final class XenstoredBench {
    let xenstored: Xenstored
    private(set) var events: [Xenstored.ConnectionID: [[String]]] = [:]
    private(set) var introduced: [UInt32] = []
    private(set) var released: [UInt32] = []

    struct Reply {
        let message: WireMessage
        var error: String? {
            message.type == .error ? String(decoding: message.payload.dropLast(), as: UTF8.self) : nil
        }
        var text: String { String(decoding: message.payload, as: UTF8.self) }
        var strings: [String] { message.strings.map { String(decoding: $0, as: UTF8.self) } }
        var isOK: Bool { message.payload == Array("OK\0".utf8) }
    }

    init(limits: Xenstored.Limits = .init()) {
        xenstored = Xenstored(limits: limits)
        xenstored.onIntroduce = { [unowned self] in introduced.append($0) }
        xenstored.onRelease = { [unowned self] in released.append($0) }
    }

    func connect(_ caller: XenstoreCaller) -> Xenstored.ConnectionID { xenstored.connect(caller) }

    @discardableResult
    func send(_ connection: Xenstored.ConnectionID, _ type: XenstoreMessageType, _ strings: [String],
              transaction: UInt32 = 0, raw: [UInt8]? = nil) -> Reply {
        let request = WireMessage(type, requestID: 42, transactionID: transaction,
                                  payload: raw ?? WireMessage.nulTerminated(strings))
        var reply: WireMessage?
        for delivery in xenstored.handle(request, from: connection) {
            if delivery.message.type == .watchEvent {
                events[delivery.connection, default: []].append(delivery.message.strings.map { String(decoding: $0, as: UTF8.self) })
            } else {
                #expect(delivery.connection == connection && reply == nil)
                reply = delivery.message
            }
        }
        #expect(reply?.requestID == 42 && reply?.transactionID == transaction)
        return Reply(message: reply!)
    }

    func write(_ connection: Xenstored.ConnectionID, _ path: String, _ value: String, transaction: UInt32 = 0) -> Reply {
        send(connection, .write, [], transaction: transaction, raw: Array(path.utf8) + [0] + Array(value.utf8))
    }

    func takeEvents(_ connection: Xenstored.ConnectionID) -> [[String]] {
        defer { events[connection] = nil }
        return events[connection] ?? []
    }
}

@Suite struct XenstoredNodeTests {
    @Test func writeReadDirectoryAndReplyFormats() {
        let bench = XenstoredBench()
        let dom0 = bench.connect(.dom0)
        #expect(bench.write(dom0, "/vm/a/b", "hello").message.payload == Array("OK\0".utf8))
        let read = bench.send(dom0, .read, ["/vm/a/b"])
        #expect(read.message.type == .read && read.message.payload == Array("hello".utf8))
        #expect(bench.write(dom0, "/vm/c", "").isOK)
        #expect(bench.send(dom0, .directory, ["/vm"]).message.payload == Array("a\0c\0".utf8))
        #expect(bench.send(dom0, .read, ["/vm/a"]).message.payload.isEmpty)
        #expect(bench.send(dom0, .directory, ["/vm/c"]).message.payload.isEmpty)
        #expect(bench.send(dom0, .read, ["/nope"]).error == "ENOENT")
        #expect(bench.send(dom0, .getDomainPath, ["7"]).text == "/local/domain/7\0")
        // Binary values keep their bytes, NULs included.
        #expect(bench.send(dom0, .write, [], raw: Array("/bin\0".utf8) + [0, 1, 0]).isOK)
        #expect(bench.send(dom0, .read, ["/bin"]).message.payload == [0, 1, 0])
    }

    @Test func mkdirAndRecursiveRm() {
        let bench = XenstoredBench()
        let dom0 = bench.connect(.dom0)
        #expect(bench.send(dom0, .mkdir, ["/x/y/z"]).isOK)
        #expect(bench.write(dom0, "/x/y/v", "1").isOK)
        #expect(bench.send(dom0, .mkdir, ["/x/y"]).isOK)
        #expect(bench.send(dom0, .read, ["/x/y/v"]).text == "1")
        #expect(bench.send(dom0, .rm, ["/x/y"]).isOK)
        #expect(bench.send(dom0, .read, ["/x/y/z"]).error == "ENOENT")
        #expect(bench.send(dom0, .directory, ["/x"]).message.payload.isEmpty)
        #expect(bench.send(dom0, .rm, ["/x/y"]).isOK, "a missing node whose parent exists")
        #expect(bench.send(dom0, .rm, ["/x/y/z"]).error == "ENOENT", "parent missing too")
        #expect(bench.send(dom0, .rm, ["/"]).error == "EINVAL")
    }

    @Test func malformedRequestsGetErrorsNotCrashes() {
        let bench = XenstoredBench()
        let dom0 = bench.connect(.dom0)
        for path in ["/a/", "/a//b", "/a b", "@introduceDomain", "", "/a\u{e9}"] {
            #expect(bench.send(dom0, .read, [path]).error == "EINVAL", "\(path)")
        }
        #expect(bench.send(dom0, .read, [], raw: Array("/a".utf8)).error == "EINVAL", "no NUL")
        #expect(bench.send(dom0, .read, ["/a", "/b"]).error == "EINVAL", "two arguments")
        #expect(bench.send(dom0, .write, [], raw: Array("/a".utf8)).error == "EINVAL")
        #expect(bench.send(dom0, .read, ["/" + String(repeating: "a", count: 3072)]).error == "EINVAL")
        #expect(bench.send(dom0, .transactionEnd, ["X"]).error == "EINVAL")
        #expect(bench.send(dom0, .watchEvent, ["/a", "t"]).error == "ENOSYS")
        var unknown = WireMessage(rawType: 20, requestID: 5, payload: [1, 2, 3])
        #expect(bench.xenstored.handle(unknown, from: dom0).map(\.message.payload) == [Array("ENOSYS\0".utf8)])
        unknown.rawType = 0xFFFF_FFFF
        #expect(bench.xenstored.handle(unknown, from: dom0).map(\.message.type) == [.error])
    }

    @Test func guestRelativePathsLiveUnderItsDomainPath() {
        let bench = XenstoredBench()
        let dom0 = bench.connect(.dom0)
        #expect(bench.send(dom0, .mkdir, ["/local/domain/3"]).isOK)
        #expect(bench.send(dom0, .setPermissions, ["/local/domain/3", "n3"]).isOK)
        let guest = bench.connect(.guest(3))
        #expect(bench.write(guest, "data/x", "1").isOK)
        #expect(bench.send(dom0, .read, ["/local/domain/3/data/x"]).text == "1")
        #expect(bench.send(guest, .read, ["data/x"]).text == "1")
    }

    @Test func directoryPartServesListsLongerThanOnePayload() {
        let bench = XenstoredBench()
        let dom0 = bench.connect(.dom0)
        let names = (0..<600).map { "child-number-\($0)" }
        for name in names { #expect(bench.send(dom0, .mkdir, ["/big/\(name)"]).isOK) }
        #expect(bench.send(dom0, .directory, ["/big"]).error == "E2BIG")
        // libxenstore's xs_directory_part loop.
        var collected: [UInt8] = []
        var generation: String?
        while true {
            let reply = bench.send(dom0, .directoryPart, ["/big", "\(collected.count)"])
            #expect(reply.message.payload.count <= WireMessage.maxPayload)
            let parts = reply.message.payload.split(separator: 0, maxSplits: 1, omittingEmptySubsequences: false)
            if let generation { #expect(String(decoding: parts[0], as: UTF8.self) == generation) }
            generation = String(decoding: parts[0], as: UTF8.self)
            collected += parts[1]
            if collected.count <= 1 || collected[collected.count - 2] == 0 { break }
        }
        collected.removeLast()
        #expect(collected == WireMessage.nulTerminated(names))
        let past = bench.send(dom0, .directoryPart, ["/big", "999999"])
        #expect(past.message.payload == Array("\(generation!)\0\0".utf8))
    }
}

@Suite struct XenstoredPermissionTests {
    /// /local/domain/5 owned by dom5, a dom0-only backend tree readable by dom5.
    func setUp() -> (XenstoredBench, Xenstored.ConnectionID, Xenstored.ConnectionID) {
        let bench = XenstoredBench()
        let dom0 = bench.connect(.dom0)
        #expect(bench.send(dom0, .mkdir, ["/local/domain/5"]).isOK)
        #expect(bench.send(dom0, .setPermissions, ["/local/domain/5", "n5", "r0"]).isOK)
        #expect(bench.write(dom0, "/local/domain/0/backend/vbd/5/51712/state", "1").isOK)
        #expect(bench.send(dom0, .setPermissions, ["/local/domain/0/backend/vbd/5/51712", "n0", "r5"]).isOK)
        #expect(bench.write(dom0, "/local/domain/0/secret", "x").isOK)
        return (bench, dom0, bench.connect(.guest(5)))
    }

    @Test func ownerReadWriteAndPerDomainEntries() {
        let (bench, dom0, guest) = setUp()
        #expect(bench.send(guest, .read, ["/local/domain/0/backend/vbd/5/51712"]).message.payload.isEmpty)
        #expect(bench.write(guest, "/local/domain/0/backend/vbd/5/51712", "x").error == "EACCES", "r5 is read only")
        #expect(bench.send(guest, .read, ["/local/domain/0/secret"]).error == "EACCES")
        #expect(bench.send(guest, .directory, ["/local/domain/0"]).error == "EACCES")
        #expect(bench.send(guest, .getPermissions, ["/local/domain/0"]).error == "EACCES")
        #expect(bench.send(guest, .read, ["/local/domain/0/backend/vbd/5/51712/missing"]).error == "ENOENT",
                "a readable parent reveals that the node is missing")
        #expect(bench.send(guest, .read, ["/local/domain/0/missing"]).error == "EACCES",
                "an unreadable parent reveals nothing")
        #expect(bench.send(dom0, .read, ["/local/domain/0/secret"]).text == "x", "dom0 is unrestricted")
        // Default entry: n0 then b5 gives dom5 both, others (dom6) nothing.
        #expect(bench.send(dom0, .setPermissions, ["/local/domain/0/secret", "n0", "b5"]).isOK)
        #expect(bench.write(guest, "/local/domain/0/secret", "y").isOK)
        let other = bench.connect(.guest(6))
        #expect(bench.send(other, .read, ["/local/domain/0/secret"]).error == "EACCES")
        #expect(bench.send(dom0, .setPermissions, ["/local/domain/0/secret", "r0"]).isOK)
        #expect(bench.send(other, .read, ["/local/domain/0/secret"]).text == "y", "default entry r")
        #expect(bench.write(other, "/local/domain/0/secret", "z").error == "EACCES")
        #expect(bench.send(guest, .rm, ["/local/domain/0/secret"]).error == "EACCES")
    }

    @Test func createdNodesInheritAndGuestsOwnWhatTheyCreate() {
        let (bench, dom0, guest) = setUp()
        #expect(bench.write(guest, "device/vbd/51712/state", "1").isOK)
        #expect(bench.send(dom0, .getPermissions, ["/local/domain/5/device/vbd"]).text == "n5\0r0\0")
        #expect(bench.send(dom0, .getPermissions, ["/local/domain/5/device/vbd/51712/state"]).strings == ["n5", "r0"])
        #expect(bench.write(dom0, "/local/domain/5/control/shutdown", "").isOK)
        #expect(bench.send(dom0, .getPermissions, ["/local/domain/5/control"]).strings == ["n5", "r0"],
                "dom0 creates with the parent's permissions unchanged")
        #expect(bench.write(dom0, "/local/domain/0/backend/vbd/5/51712/new/x", "1").isOK)
        #expect(bench.send(dom0, .getPermissions, ["/local/domain/0/backend/vbd/5/51712/new/x"]).strings == ["n0", "r5"])
        #expect(bench.send(guest, .mkdir, ["/local/domain/0/backend/vbd/5/51712/y"]).error == "EACCES",
                "creating needs write on the closest existing ancestor")
        #expect(bench.send(guest, .mkdir, ["/local/domain/9/y"]).error == "EACCES")
    }

    @Test func onlyOwnersSetPermissionsAndGuestsKeepOwnership() {
        let (bench, dom0, guest) = setUp()
        #expect(bench.write(guest, "device/x", "1").isOK)
        #expect(bench.send(guest, .setPermissions, ["device/x", "n5", "r0", "b7"]).isOK)
        #expect(bench.send(dom0, .getPermissions, ["/local/domain/5/device/x"]).strings == ["n5", "r0", "b7"])
        #expect(bench.send(guest, .setPermissions, ["device/x", "n7"]).error == "EPERM")
        #expect(bench.send(guest, .setPermissions, ["/local/domain/0/backend/vbd/5/51712", "n5"]).error == "EACCES")
        #expect(bench.send(guest, .setPermissions, ["device/x", "q5"]).error == "EINVAL")
        #expect(bench.send(guest, .setPermissions, ["device/x"]).error == "EINVAL")
        let dom7 = bench.connect(.guest(7))
        #expect(bench.write(dom7, "/local/domain/5/device/x", "from7").isOK, "b7 grants write")
        #expect(bench.send(dom7, .setPermissions, ["/local/domain/5/device/x", "n7"]).error == "EACCES", "but not ownership")
    }

    @Test func privilegedRequestsAreRefusedToGuests() {
        let (bench, dom0, guest) = setUp()
        for (type, arguments) in [(XenstoreMessageType.introduce, ["6", "1", "2"]), (.release, ["5"]),
                                  (.isDomainIntroduced, ["5"]), (.setTarget, ["5", "6"]), (.resume, ["5"]),
                                  (.control, ["print", "x"])] {
            #expect(bench.send(guest, type, arguments).error == "EACCES", "\(type)")
        }
        #expect(bench.send(dom0, .isDomainIntroduced, ["5"]).text == "F\0")
        #expect(bench.send(dom0, .introduce, ["5", "4096", "3"]).isOK)
        #expect(bench.introduced == [5])
        #expect(bench.send(dom0, .isDomainIntroduced, ["5"]).text == "T\0")
        #expect(bench.send(dom0, .introduce, ["0", "1", "1"]).error == "EINVAL")
        #expect(bench.send(dom0, .introduce, ["5", "x", "1"]).error == "EINVAL")
        #expect(bench.send(dom0, .release, ["5"]).isOK)
        #expect(bench.released == [5])
        #expect(bench.send(dom0, .release, ["5"]).error == "ENOENT")
        #expect(bench.send(dom0, .control, ["print", "hello"]).isOK)
        #expect(bench.send(dom0, .control, ["frobnicate"]).error == "EINVAL")
    }
}

@Suite struct XenstoredTransactionTests {
    func start(_ bench: XenstoredBench, _ connection: Xenstored.ConnectionID) -> UInt32 {
        let reply = bench.send(connection, .transactionStart, [""])
        #expect(reply.message.type == .transactionStart && reply.text.hasSuffix("\0"))
        return UInt32(reply.text.dropLast())!
    }

    @Test func readYourWritesThenCommit() {
        let bench = XenstoredBench()
        let dom0 = bench.connect(.dom0)
        let other = bench.connect(.dom0)
        let id = start(bench, dom0)
        #expect(id != 0)
        #expect(bench.write(dom0, "/t/a", "1", transaction: id).isOK)
        #expect(bench.send(dom0, .read, ["/t/a"], transaction: id).text == "1")
        #expect(bench.send(dom0, .directory, ["/t"], transaction: id).text == "a\0")
        #expect(bench.send(other, .read, ["/t/a"]).error == "ENOENT", "invisible before commit")
        #expect(bench.send(dom0, .transactionEnd, ["T"], transaction: id).isOK)
        #expect(bench.send(other, .read, ["/t/a"]).text == "1")
        #expect(bench.send(dom0, .read, ["/t/a"], transaction: id).error == "ENOENT", "the id is gone")
    }

    @Test func conflictingCommitGetsEAGAIN() {
        let bench = XenstoredBench()
        let first = bench.connect(.dom0)
        let second = bench.connect(.dom0)
        #expect(bench.write(first, "/c/x", "0").isOK)
        let a = start(bench, first)
        let b = start(bench, second)
        #expect(bench.send(first, .read, ["/c/x"], transaction: a).text == "0")
        #expect(bench.write(first, "/c/x", "a", transaction: a).isOK)
        #expect(bench.send(second, .read, ["/c/x"], transaction: b).text == "0")
        #expect(bench.write(second, "/c/x", "b", transaction: b).isOK)
        #expect(bench.send(first, .transactionEnd, ["T"], transaction: a).isOK)
        #expect(bench.send(second, .transactionEnd, ["T"], transaction: b).error == "EAGAIN")
        #expect(bench.send(first, .read, ["/c/x"]).text == "a")
        // A plain write to a node a transaction read also conflicts.
        let c = start(bench, second)
        _ = bench.send(second, .read, ["/c/x"], transaction: c)
        #expect(bench.write(first, "/c/x", "z").isOK)
        #expect(bench.send(second, .transactionEnd, ["T"], transaction: c).error == "EAGAIN")
        // Unrelated nodes do not conflict.
        let d = start(bench, second)
        #expect(bench.write(second, "/c/y", "1", transaction: d).isOK)
        #expect(bench.write(first, "/other", "1").isOK)
        #expect(bench.send(second, .transactionEnd, ["T"], transaction: d).isOK)
    }

    @Test func abortDiscardsAndUnknownIdsAreENOENT() {
        let bench = XenstoredBench()
        let dom0 = bench.connect(.dom0)
        let id = start(bench, dom0)
        #expect(bench.write(dom0, "/gone", "1", transaction: id).isOK)
        #expect(bench.send(dom0, .rm, ["/local"], transaction: id).isOK)
        #expect(bench.send(dom0, .transactionEnd, ["F"], transaction: id).isOK)
        #expect(bench.send(dom0, .read, ["/gone"]).error == "ENOENT")
        #expect(bench.send(dom0, .read, ["/local/domain/0/name"]).text == "Domain-0")
        #expect(bench.send(dom0, .read, ["/local"], transaction: 999).error == "ENOENT")
        #expect(bench.send(dom0, .transactionEnd, ["T"]).error == "ENOENT")
        let open = start(bench, dom0)
        #expect(bench.send(dom0, .transactionStart, [""], transaction: open).error == "EBUSY")
        // Transactions belong to their connection.
        let other = bench.connect(.dom0)
        #expect(bench.send(other, .read, ["/local"], transaction: open).error == "ENOENT")
    }

    @Test func watchesFireOnlyAtCommit() {
        let bench = XenstoredBench()
        let dom0 = bench.connect(.dom0)
        let watcher = bench.connect(.dom0)
        #expect(bench.send(watcher, .watch, ["/w", "tok"]).isOK)
        _ = bench.takeEvents(watcher)
        let id = start(bench, dom0)
        #expect(bench.write(dom0, "/w/a", "1", transaction: id).isOK)
        #expect(bench.takeEvents(watcher).isEmpty)
        #expect(bench.send(dom0, .transactionEnd, ["T"], transaction: id).isOK)
        #expect(bench.takeEvents(watcher) == [["/w/a", "tok"]])
        let aborted = start(bench, dom0)
        #expect(bench.write(dom0, "/w/b", "1", transaction: aborted).isOK)
        #expect(bench.send(dom0, .transactionEnd, ["F"], transaction: aborted).isOK)
        #expect(bench.takeEvents(watcher).isEmpty)
    }
}

@Suite struct XenstoredWatchTests {
    @Test func firesAtRegistrationAndForChangesAtOrBelow() {
        let bench = XenstoredBench()
        let dom0 = bench.connect(.dom0)
        let watcher = bench.connect(.dom0)
        #expect(bench.send(watcher, .watch, ["/be", "t1"]).isOK)
        #expect(bench.takeEvents(watcher) == [["/be", "t1"]])
        #expect(bench.send(watcher, .watch, ["/be", "t1"]).error == "EEXIST")
        #expect(bench.write(dom0, "/be/1/state", "2").isOK)
        #expect(bench.write(dom0, "/bee", "x").isOK)
        #expect(bench.write(dom0, "/be", "x").isOK)
        #expect(bench.send(dom0, .setPermissions, ["/be", "n0", "r1"]).isOK)
        #expect(bench.takeEvents(watcher) == [["/be/1/state", "t1"], ["/be", "t1"], ["/be", "t1"]])
        #expect(bench.send(watcher, .unwatch, ["/be", "t1"]).isOK)
        #expect(bench.send(watcher, .unwatch, ["/be", "t1"]).error == "ENOENT")
        #expect(bench.write(dom0, "/be/2", "x").isOK)
        #expect(bench.takeEvents(watcher).isEmpty)
    }

    @Test func removalReachesWatchersOfTheNodeAncestorsAndDescendants() {
        let bench = XenstoredBench()
        let dom0 = bench.connect(.dom0)
        let watcher = bench.connect(.dom0)
        #expect(bench.write(dom0, "/r/a/b/c", "1").isOK)
        for path in ["/r", "/r/a/b", "/r/a/b/c/d"] { #expect(bench.send(watcher, .watch, [path, path]).isOK) }
        _ = bench.takeEvents(watcher)
        #expect(bench.send(dom0, .rm, ["/r/a"]).isOK)
        let events = bench.takeEvents(watcher)
        #expect(events.contains(["/r/a", "/r"]))
        #expect(events.contains(["/r/a/b", "/r/a/b"]))
        #expect(!events.contains { $0[1] == "/r/a/b/c/d" }, "a watch below never existing nodes does not fire")
        #expect(events.count == 2)
    }

    @Test func relativeWatchesGetRelativePaths() {
        let bench = XenstoredBench()
        let dom0 = bench.connect(.dom0)
        #expect(bench.send(dom0, .mkdir, ["/local/domain/4"]).isOK)
        #expect(bench.send(dom0, .setPermissions, ["/local/domain/4", "n4"]).isOK)
        let guest = bench.connect(.guest(4))
        #expect(bench.send(guest, .watch, ["device", "dev"]).isOK)
        #expect(bench.takeEvents(guest) == [["device", "dev"]])
        #expect(bench.write(dom0, "/local/domain/4/device/vbd/1", "x").isOK)
        #expect(bench.takeEvents(guest) == [["device/vbd/1", "dev"]])
    }

    @Test func guestsOnlyHearAboutNodesTheyMayRead() {
        let bench = XenstoredBench()
        let dom0 = bench.connect(.dom0)
        let guest = bench.connect(.guest(2))
        #expect(bench.send(guest, .watch, ["/local/domain/0", "t"]).isOK)
        #expect(bench.send(guest, .watch, [Xenstored.introduceDomainPath, "i"]).isOK)
        _ = bench.takeEvents(guest)
        #expect(bench.write(dom0, "/local/domain/0/hidden", "x").isOK)
        #expect(bench.takeEvents(guest).isEmpty)
        #expect(bench.write(dom0, "/local/domain/0/shared", "x").isOK)
        #expect(bench.send(dom0, .setPermissions, ["/local/domain/0/shared", "n0", "r2"]).isOK)
        #expect(bench.write(dom0, "/local/domain/0/shared", "y").isOK)
        #expect(bench.takeEvents(guest) == [["/local/domain/0/shared", "t"], ["/local/domain/0/shared", "t"]],
                "the permission change and the write")
        let toolstack = bench.connect(.dom0)
        #expect(bench.send(toolstack, .watch, [Xenstored.introduceDomainPath, "i"]).isOK)
        #expect(bench.send(toolstack, .watch, [Xenstored.releaseDomainPath, "r"]).isOK)
        _ = bench.takeEvents(toolstack)
        #expect(bench.send(dom0, .introduce, ["9", "1", "1"]).isOK)
        #expect(bench.send(dom0, .release, ["9"]).isOK)
        #expect(bench.takeEvents(toolstack) == [["@introduceDomain", "i"], ["@releaseDomain", "r"]])
        #expect(bench.takeEvents(guest).isEmpty)
    }

    @Test func disconnectDropsWatchesAndTransactions() {
        let bench = XenstoredBench()
        let dom0 = bench.connect(.dom0)
        let watcher = bench.connect(.dom0)
        #expect(bench.send(watcher, .watch, ["/", "all"]).isOK)
        #expect(bench.takeEvents(watcher) == [["/", "all"]])
        bench.xenstored.disconnect(watcher)
        #expect(bench.write(dom0, "/x", "1").isOK)
        #expect(bench.takeEvents(watcher).isEmpty)
        #expect(bench.xenstored.handle(WireMessage(.read, strings: ["/x"]), from: watcher).isEmpty)
    }
}

@Suite struct XenstoredQuotaTests {
    func guestBench(_ limits: Xenstored.Limits) -> (XenstoredBench, Xenstored.ConnectionID, Xenstored.ConnectionID) {
        let bench = XenstoredBench(limits: limits)
        let dom0 = bench.connect(.dom0)
        #expect(bench.send(dom0, .mkdir, ["/local/domain/8"]).isOK)
        #expect(bench.send(dom0, .setPermissions, ["/local/domain/8", "n8"]).isOK)
        return (bench, dom0, bench.connect(.guest(8)))
    }

    @Test func nodeCountQuota() {
        var limits = Xenstored.Limits()
        limits.maxNodesPerDomain = 5
        let (bench, dom0, guest) = guestBench(limits)
        // /local/domain/8 itself is dom8's first node.
        #expect(bench.send(guest, .mkdir, ["a/b/c"]).isOK)
        #expect(bench.send(guest, .mkdir, ["d/e"]).error == "ENOSPC", "needs two, one left")
        #expect(bench.send(guest, .read, ["d"]).error == "ENOENT", "nothing half-created")
        #expect(bench.send(guest, .mkdir, ["d"]).isOK)
        #expect(bench.send(guest, .mkdir, ["f"]).error == "ENOSPC")
        #expect(bench.send(guest, .rm, ["a"]).isOK)
        #expect(bench.send(guest, .mkdir, ["f"]).isOK, "removal gives quota back")
        #expect(bench.send(dom0, .mkdir, ["/local/domain/8/g/h/i"]).isOK, "dom0 is not limited")
    }

    @Test func nodeSizeWatchAndTransactionQuotas() {
        var limits = Xenstored.Limits()
        limits.maxWatchesPerConnection = 2
        limits.maxTransactionsPerConnection = 2
        let (bench, dom0, guest) = guestBench(limits)
        #expect(bench.write(guest, "big", String(repeating: "x", count: 2048)).error == "ENOSPC")
        #expect(bench.write(guest, "ok", String(repeating: "x", count: 2000)).isOK)
        #expect(bench.write(dom0, "/local/domain/0/big", String(repeating: "x", count: 4000)).isOK)
        #expect(bench.send(guest, .watch, ["a", "1"]).isOK)
        #expect(bench.send(guest, .watch, ["a", "2"]).isOK)
        #expect(bench.send(guest, .watch, ["a", "3"]).error == "E2BIG")
        #expect(bench.send(guest, .transactionStart, [""]).message.type == .transactionStart)
        #expect(bench.send(guest, .transactionStart, [""]).message.type == .transactionStart)
        #expect(bench.send(guest, .transactionStart, [""]).error == "ENOSPC")
        #expect(bench.send(guest, .resetWatches, [""]).isOK)
        #expect(bench.send(guest, .watch, ["a", "3"]).isOK)
        #expect(bench.send(guest, .transactionStart, [""]).message.type == .transactionStart)
        #expect(bench.send(guest, .setPermissions, ["ok", "n8", "r1", "r2", "r3", "r4", "r5"]).error == "ENOSPC")
    }
}
