import Foundation
import Testing
import Xenbus
import XenStoreTestSupport

/// The simulated xenstored through real clients: Debian's xenstore-utils and libxenstore.
@Suite(.serialized) struct XenstoredIntegrationTests {
    @Test func xenstoreUtilsWorkAsOnXen() throws {
        let sim = try Simulator("xs-utils")
        defer { sim.stop() }
        #expect(try sim.xenstore("xenstore-write", ["/local/domain/0/backend/vbd/1/51712/state", "1",
                                                     "/local/domain/0/backend/vbd/1/51712/mode", "w"]).status == 0)
        let read = try sim.xenstore("xenstore-read", ["/local/domain/0/backend/vbd/1/51712/state"])
        #expect(read.status == 0 && read.stdout == "1\n")
        let list = try sim.xenstore("xenstore-list", ["/local/domain/0/backend/vbd/1/51712"])
        #expect(list.stdout.split(separator: "\n") == ["state", "mode"])
        let ls = try sim.xenstore("xenstore-ls", ["/local/domain/0/backend"])
        #expect(ls.status == 0 && ls.stdout.contains("51712 = \"\"") && ls.stdout.contains("mode = \"w\""))
        #expect(try sim.xenstore("xenstore-chmod", ["/local/domain/0/backend/vbd/1", "n0", "r1"]).status == 0)
        let perms = try sim.xenstore("xenstore-ls", ["-p", "/local/domain/0/backend/vbd"])
        #expect(perms.stdout.contains("(n0,r1)"))
        #expect(try sim.xenstore("xenstore-exists", ["/local/domain/0/backend/vbd/1"]).status == 0)
        #expect(try sim.xenstore("xenstore-exists", ["/local/domain/0/backend/vbd/2"]).status != 0)
        #expect(try sim.xenstore("xenstore-rm", ["/local/domain/0/backend/vbd/1"]).status == 0)
        #expect(try sim.xenstore("xenstore-exists", ["/local/domain/0/backend/vbd/1/51712/state"]).status != 0)
        let missing = try sim.xenstore("xenstore-read", ["/local/domain/0/backend/vbd/1/51712/state"])
        #expect(missing.status != 0)
    }

    @Test func xenstoreWatchSeesTheInitialEventAndChanges() throws {
        let sim = try Simulator("xs-watch")
        defer { sim.stop() }
        let watch = try BackgroundProcess(try Harness.which("xenstore-watch"), ["/local/domain/0/watched"],
                                          environment: sim.dom0Environment)
        // Observed here: xenstore-watch does not end on SIGTERM within 10 s, so it is killed.
        defer { watch.stop(signal: SIGKILL, grace: 5) }
        #expect(eventually { watch.output.contains("/local/domain/0/watched") })
        #expect(try sim.xenstore("xenstore-write", ["/local/domain/0/watched/state", "4"]).status == 0)
        #expect(eventually { watch.output.contains("/local/domain/0/watched/state") })
        #expect(try sim.xenstore("xenstore-write", ["/local/domain/0/elsewhere", "4"]).status == 0)
        #expect(try sim.xenstore("xenstore-rm", ["/local/domain/0/watched"]).status == 0)
        #expect(eventually { watch.output.split(separator: "\n").count >= 3 })
        #expect(!watch.output.contains("elsewhere"))
        #expect(watch.isRunning)
    }

    @Test func guestSocketCarriesTheGuestsPermissions() throws {
        let sim = try Simulator("xs-guest")
        defer { sim.stop() }
        let dom0 = try openXenStore(socket: sim.xenstoredSocket)
        try dom0.write("/local/domain/0/secret", "x")
        try dom0.mkdir("/local/domain/3")
        try dom0.setPermissions("/local/domain/3", [XenStorePermission(domid: 3, access: .none)])
        #expect(!dom0.isDomainIntroduced(3))
        try dom0.introduceDomain(3, mfn: 0x1234, eventChannel: 1)
        #expect(dom0.isDomainIntroduced(3))
        let socket = sim.guestEnvironment(3)["XENSTORED_PATH"]!
        #expect(FileManager.default.fileExists(atPath: socket), "ready when INTRODUCE returns")

        let guest = try openXenStore(socket: socket)
        #expect(throws: XenStoreError.self) { try guest.read("/local/domain/0/secret") }
        do {
            _ = try guest.read("/local/domain/0/secret")
        } catch let error as XenStoreError {
            #expect(error.errno == EACCES)
        }
        do {
            try guest.write("/local/domain/0/mine", "1")
            Issue.record("a guest wrote into dom0's tree")
        } catch let error as XenStoreError {
            #expect(error.errno == EACCES)
        }
        try guest.write("device/vbd/51712/state", "1")
        #expect(try dom0.read("/local/domain/3/device/vbd/51712/state") == "1")
        #expect(try dom0.permissions("/local/domain/3/device/vbd/51712/state").first?.domid == 3)
        #expect(try guest.domainPath(3) == "/local/domain/3")

        let cli = try sim.xenstore("xenstore-read", ["/local/domain/0/secret"], asDomain: 3)
        #expect(cli.status != 0)
        #expect(try sim.xenstore("xenstore-read", ["device/vbd/51712/state"], asDomain: 3).stdout == "1\n")

        try dom0.releaseDomain(3)
        #expect(!FileManager.default.fileExists(atPath: socket))
        #expect(!dom0.isDomainIntroduced(3))
        #expect(throws: XenStoreError.self) { try guest.read("device/vbd/51712/state") }
    }

    @Test func conflictingTransactionCommitGetsEAGAIN() throws {
        let sim = try Simulator("xs-tx")
        defer { sim.stop() }
        let first = try openXenStore(socket: sim.xenstoredSocket)
        let second = try openXenStore(socket: sim.xenstoredSocket)
        try first.write("/local/domain/0/counter", "0")
        let a = try first.startTransaction()
        let b = try second.startTransaction()
        #expect(try first.read("/local/domain/0/counter", transaction: a) == "0")
        #expect(try second.read("/local/domain/0/counter", transaction: b) == "0")
        try first.write("/local/domain/0/counter", "1", transaction: a)
        try second.write("/local/domain/0/counter", "1", transaction: b)
        try first.endTransaction(a)
        do {
            try second.endTransaction(b)
            Issue.record("the second commit succeeded")
        } catch let error as XenStoreError {
            #expect(error.isConflict)
        }
        // The retry loop every client runs then succeeds.
        try second.transaction { t in
            let value = Int(try second.read("/local/domain/0/counter", transaction: t) ?? "0")!
            try second.write("/local/domain/0/counter", "\(value + 1)", transaction: t)
        }
        #expect(try first.read("/local/domain/0/counter") == "2")
    }

    @Test func garbageFromOneClientDoesNotStopTheServer() throws {
        let sim = try Simulator("xs-garbage")
        defer { sim.stop() }
        var generator = SystemRandomNumberGenerator()
        var socket = try RawSocket(sim.xenstoredSocket)
        for index in 0..<1000 {
            let length = Int.random(in: 0...64, using: &generator)
            var message = [UInt8](repeating: 0, count: 16 + length)
            for offset in 0..<message.count { message[offset] = UInt8.random(in: 0...255, using: &generator) }
            message[12] = UInt8(length)
            message[13] = 0; message[14] = 0; message[15] = 0
            if index % 3 == 0 { message[0] = UInt8.random(in: 0...23, using: &generator); message[1...3] = [0, 0, 0] }
            try socket.send(message)
            // Every request within the size limit gets exactly one reply.
            #expect(try socket.receiveReply() != nil, "reply to garbage message \(index)")
        }
        // A header announcing more than XENSTORE_PAYLOAD_MAX ends that connection only.
        try socket.send([2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])
        #expect(try socket.receiveReply() == nil, "disconnected")
        socket = try RawSocket(sim.xenstoredSocket)
        try socket.send([11, 0, 0, 0] + [0, 0, 0, 0] + [0, 0, 0, 0] + [3, 0, 0, 0] + Array("/a".utf8))
        socket.close()

        let store = try openXenStore(socket: sim.xenstoredSocket)
        try store.write("/local/domain/0/alive", "yes")
        #expect(try store.read("/local/domain/0/alive") == "yes")
        #expect(try sim.xenstore("xenstore-read", ["/local/domain/0/alive"]).stdout == "yes\n")
    }

    @Test func stopRemovesSocketsAndPidFile() throws {
        let sim = try Simulator("xs-stop")
        let pidFile = sim.directory.appendingPathComponent("xensim.pid").path
        let pid = try #require(Int32(String(contentsOfFile: pidFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)))
        #expect(kill(pid, 0) == 0)
        let again = try sim.xensim(["run"], ["--detach"])
        #expect(again.status != 0 && again.stderr.contains("already runs"))
        let stopped = try sim.xensim(["stop"])
        #expect(stopped.status == 0)
        #expect(!FileManager.default.fileExists(atPath: sim.xenstoredSocket))
        #expect(!FileManager.default.fileExists(atPath: pidFile))
        #expect(eventually { kill(pid, 0) != 0 })
        sim.stop()
    }
}

/// A bare unix socket speaking raw bytes, for feeding the server what no library would send.
private struct RawSocket {
    let descriptor: Int32

    init(_ path: String) throws {
        descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { throw HarnessError("connect \(path): errno \(errno)") }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    func send(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let sent = bytes.withUnsafeBytes { Glibc.send(descriptor, $0.baseAddress! + offset, bytes.count - offset, Int32(MSG_NOSIGNAL)) }
            guard sent > 0 else { throw HarnessError("send: errno \(errno)") }
            offset += sent
        }
    }

    private func receive(_ count: Int) throws -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var offset = 0
        while offset < count {
            let received = bytes.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress! + offset, count - offset, 0) }
            if received == 0 { return nil }
            guard received > 0 else { throw HarnessError("recv: errno \(errno)") }
            offset += received
        }
        return bytes
    }

    /// The next message that is not a watch event; nil when the server closed the connection.
    func receiveReply() throws -> (type: UInt32, payload: [UInt8])? {
        while true {
            guard let header = try receive(16) else { return nil }
            let type = UInt32(header[0]) | UInt32(header[1]) << 8
            let length = Int(header[12]) | Int(header[13]) << 8
            guard let payload = try receive(length) else { return nil }
            if type != 15 { return (type, payload) }
        }
    }

    func close() { Glibc.close(descriptor) }
}
