import Dispatch
import Glibc
import Logging
import NBD
import VBDInterface

/// An NBD export the rings connect to, and how long requests wait for a lost server.
struct NBDTarget: Sendable {
    let export: NBDExport
    /// Seconds requests wait for a lost server before they fail.
    let retryTimeout: Double

    var uri: String { export.uri }
    var retryNanoseconds: UInt64 { UInt64(retryTimeout * 1e9) }
}

/// One ring's connection to an NBD export, driven by the ring worker's thread: commands go
/// out through libnbd's asynchronous calls, the socket is polled in the worker's io_uring
/// beside the event channel, and answers come back as completions carrying the request's
/// tag, as local I/O does. A lost connection is made again; the commands it took with it
/// wait and are sent again, until `retryTimeout` has passed since the loss: from then on they
/// fail (EIO) while reconnecting goes on, and requests flow again once it succeeds.
final class NBDRingClient: NetworkStoreClient {
    /// Tags of this client's socket polls in the worker's io_uring: `pollTagBase + sequence`,
    /// far above any request slot's tag.
    static let pollTagBase: UInt64 = 1 << 62
    static func isPollTag(_ tag: UInt64) -> Bool { tag >= pollTagBase && tag - pollTagBase <= UInt64(UInt32.max) }

    private let target: NBDTarget
    private let name: String
    private var logger: Logger
    private var connection: NBDConnection?
    private var inFlight: [UInt64: StoreCommand] = [:]
    /// Commands to send once connected, oldest first.
    private var waiting: [StoreCommand] = []
    private var answered: [IOURing.Completion] = []
    /// The poll armed on the socket: its tag and what it waits for.
    private var armed: (tag: UInt64, direction: NBDDirection)?
    private var pollSequence: UInt64 = 0
    /// Since when no connection is ready (nil while one is); the first connect counts too.
    private var lostSince: UInt64?
    private var nextAttempt: UInt64 = 0
    private var failedAttempts = 0
    /// A connection was ready once: the next ready one is a reconnect.
    private var everConnected = false
    /// The last answer, or the first command after an idle spell: commands in flight with
    /// no answer for a second get their socket polled anew (`recheck`).
    private var lastProgress: UInt64 = 0
    private var recheckedAt: UInt64 = 0
    private let statistics: RingStatistics

    init(target: NBDTarget, name: String, statistics: RingStatistics, logger: Logger) {
        self.target = target
        self.name = name
        self.statistics = statistics
        self.logger = logger
        lostSince = DispatchTime.now().uptimeNanoseconds
    }

    /// The largest payload of one command: the server's maximum block size, else the 32 MiB
    /// every server takes (the NBD protocol's recommendation).
    var maxPayload: Int {
        let maximum = Int(target.export.info.maximumBlockSize)
        return maximum > 0 ? maximum : 32 << 20
    }

    var canFlush: Bool { target.export.info.canFlush }

    /// Sends the command now, or keeps it for when the connection is ready.
    func submit(_ command: StoreCommand) {
        guard let connection, lostSince == nil else {
            return hold(command)
        }
        do {
            if inFlight.isEmpty { lastProgress = DispatchTime.now().uptimeNanoseconds }
            inFlight[try issue(command, on: connection)] = command
        } catch {
            if connection.isDead {
                connectionLost(error)
                hold(command)
            } else {
                answered.append(IOURing.Completion(tag: command.tag, result: -error.errno, more: false))
            }
        }
    }

    private func hold(_ command: StoreCommand) {
        if let since = lostSince, DispatchTime.now().uptimeNanoseconds &- since >= target.retryNanoseconds {
            answered.append(IOURing.Completion(tag: command.tag, result: -EIO, more: false))
        } else {
            waiting.append(command)
        }
    }

    private func issue(_ command: StoreCommand, on connection: NBDConnection) throws(NBDError) -> UInt64 {
        switch command.operation {
        case .read(let buffer, let count): try connection.read(into: buffer, count: count, offset: command.offset)
        case .write(let buffer, let count): try connection.write(from: buffer, count: count, offset: command.offset)
        case .flush: try connection.flush()
        case .discard(let count): try connection.trim(count: count, offset: command.offset)
        }
    }

    /// Before the worker sleeps: connects when due, arms the socket's poll in `uring` for what
    /// libnbd waits on, fails what waited past the deadline. Returns how long the worker may
    /// sleep before this client has something to do (nil: until an event).
    func prepareToWait(_ uring: IOURing, cancellationTag: UInt64) -> Int? {
        // Sending a command can find the server gone (the handle dies without a poll firing).
        collect()
        let now = DispatchTime.now().uptimeNanoseconds
        if lostSince != nil, connection == nil, now >= nextAttempt { startConnecting() }
        if let since = lostSince, !waiting.isEmpty, now &- since >= target.retryNanoseconds {
            logger.error("NBD server \(target.uri) unreachable for \(target.retryTimeout) s: failing \(waiting.count) waiting request(s); still reconnecting")
            for command in waiting { answered.append(IOURing.Completion(tag: command.tag, result: -EIO, more: false)) }
            waiting.removeAll()
        }
        if lostSince == nil, !inFlight.isEmpty, now &- max(lastProgress, recheckedAt) >= 1_000_000_000 {
            recheck(uring, cancellationTag: cancellationTag)
        }
        arm(uring, cancellationTag: cancellationTag)
        if !answered.isEmpty { return 0 }
        // Never asleep for good with commands out: a poll that did not fire is made again.
        guard let since = lostSince else { return inFlight.isEmpty ? nil : 1000 }
        var due = connection == nil ? nextAttempt : UInt64.max
        if !waiting.isEmpty { due = min(due, since &+ target.retryNanoseconds) }
        guard due != UInt64.max else { return nil }
        return due <= now ? 0 : Int((due - now + 999_999) / 1_000_000)
    }

    private func arm(_ uring: IOURing, cancellationTag: UInt64) {
        var wanted = connection.flatMap { $0.fileDescriptor == nil ? nil : $0.direction } ?? []
        // libnbd's READY state can report no direction with commands in flight; their
        // answers (or the server's hangup) arrive as readability all the same.
        if connection?.isReady == true, !inFlight.isEmpty { wanted.insert(.read) }
        if let armed, armed.direction == wanted { return }
        if let armed {
            // Waits for something else now (a full socket, another connection): replace it.
            try? uring.cancelPoll(tag: armed.tag, reportingAs: cancellationTag)
            self.armed = nil
        }
        guard !wanted.isEmpty, let descriptor = connection?.fileDescriptor else { return }
        pollSequence = (pollSequence + 1) & UInt64(UInt32.max)
        let tag = Self.pollTagBase + pollSequence
        do {
            try uring.poll(descriptor, readable: wanted.contains(.read), writable: wanted.contains(.write), tag: tag)
            armed = (tag, wanted)
        } catch {
            logger.warning("polling the NBD socket: \(error)")
        }
    }

    /// Commands in flight and no answer for a second: a healthy server answers long before,
    /// so the socket is looked at again and polled anew, in case a wakeup went missing (the
    /// server itself being slow costs one poll). Once seen mid-benchmark as a guest waiting
    /// 30 s on 32 writes. libnbd is told only what the socket is ready for: a read
    /// notification with nothing to read would pause a command being sent, for good.
    private func recheck(_ uring: IOURing, cancellationTag: UInt64) {
        let firstInThisStall = recheckedAt <= lastProgress
        recheckedAt = DispatchTime.now().uptimeNanoseconds
        guard let connection else { return }
        logger.log(level: firstInThisStall ? .warning : .debug, "NBD server \(target.uri): \(inFlight.count) command(s) unanswered for 1 s; polling the socket anew (libnbd waits for \(connection.direction.rawValue), poll armed for \(armed?.direction.rawValue ?? 0))")
        if let armed {
            try? uring.cancelPoll(tag: armed.tag, reportingAs: cancellationTag)
            self.armed = nil
        }
        do {
            try connection.notify(try connection.readiness(of: connection.direction.union(.read)))
        } catch {
            logger.debug("NBD socket: \(error)")
        }
        collect()
    }

    /// A poll of this client's fired (or was cancelled).
    func pollFired(_ completion: IOURing.Completion) {
        guard let armed, completion.tag == armed.tag else { return }   // a replaced poll
        self.armed = nil
        guard let connection, completion.result >= 0 else { return }
        var ready: NBDDirection = []
        let events = Int16(truncatingIfNeeded: completion.result)
        if events & Int16(POLLIN | POLLHUP | POLLERR) != 0 { ready.insert(.read) }
        if events & Int16(POLLOUT | POLLERR) != 0 { ready.insert(.write) }
        do {
            try connection.notify(ready.intersection(armed.direction))
        } catch {
            logger.debug("NBD socket: \(error)")
        }
        collect()
    }

    /// Retires what the server answered and notices a connection that became ready or died.
    private func collect() {
        guard let connection else { return }
        var retired = false
        while let (cookie, error) = connection.retireCompleted() {
            guard let command = inFlight.removeValue(forKey: cookie) else { continue }
            retired = true
            if error != 0, connection.isDead {
                waiting.append(command)   // lost with the connection: sent again on the next
            } else {
                answered.append(IOURing.Completion(tag: command.tag, result: error == 0 ? command.successResult : -error, more: false))
            }
        }
        if retired { lastProgress = DispatchTime.now().uptimeNanoseconds }
        if connection.isDead {
            connectionLost(NBDError(errno: ECONNRESET, message: "the connection to \(target.uri) was lost"))
        } else if lostSince != nil, connection.isReady {
            connected(connection)
        }
    }

    private func startConnecting() {
        do {
            let connection = try NBDConnection(name: name)
            try connection.startConnecting(uri: target.uri)
            self.connection = connection
            collect()
        } catch {
            attemptFailed(error)
        }
    }

    private func connected(_ connection: NBDConnection) {
        if everConnected, let since = lostSince {
            let seconds = Double(DispatchTime.now().uptimeNanoseconds &- since) / 1e9
            logger.notice("NBD server \(target.uri) reachable again after \(String(format: "%.1f", seconds)) s; sending \(waiting.count) waiting command(s)")
        }
        statistics.update {
            if everConnected { $0.storeReconnects += 1 }
            $0.storeWaitingRings = 0
        }
        everConnected = true
        lostSince = nil
        failedAttempts = 0
        let resend = waiting
        waiting.removeAll()
        for command in resend { submit(command) }
    }

    private func connectionLost(_ error: NBDError) {
        guard connection != nil else { return }
        // What libnbd did not retire went down with the connection too.
        let lost = inFlight.sorted { $0.key < $1.key }.map(\.value)
        inFlight.removeAll()
        waiting.insert(contentsOf: lost, at: 0)
        self.connection = nil
        if lostSince == nil {
            lostSince = DispatchTime.now().uptimeNanoseconds
            statistics.update { $0.storeWaitingRings = 1 }
            logger.error("NBD server \(target.uri): \(error); \(waiting.count) command(s) wait while reconnecting (up to \(target.retryTimeout) s)")
        } else {
            attemptFailed(error)
            return
        }
        nextAttempt = DispatchTime.now().uptimeNanoseconds
    }

    private func attemptFailed(_ error: NBDError) {
        connection = nil
        failedAttempts += 1
        statistics.update { $0.storeWaitingRings = 1 }
        // 50 ms, doubling to 2 s between attempts.
        let delay = min(UInt64(50_000_000) << UInt64(min(failedAttempts - 1, 6)), 2_000_000_000)
        nextAttempt = DispatchTime.now().uptimeNanoseconds + delay
        if failedAttempts == 1 || failedAttempts % 30 == 0 {
            logger.warning("connecting to NBD server \(target.uri) (attempt \(failedAttempts)): \(error)")
        }
    }

    /// Reads answers already on the socket. Never while libnbd sends a command: it would
    /// pause the send to read.
    func drain() {
        guard let connection, lostSince == nil, !inFlight.isEmpty, !connection.direction.contains(.write) else { return }
        do { try connection.notify(.read) } catch { logger.debug("NBD socket: \(error)") }
        collect()
    }

    /// Hands over what finished since the last call.
    func reap(_ body: (IOURing.Completion) -> Void) {
        guard !answered.isEmpty else { return }
        let finished = answered
        answered.removeAll(keepingCapacity: true)
        for completion in finished { body(completion) }
    }
}
