import Dispatch
import Glibc
import Logging
import RBD

/// One ring's commands on a VBD's RBD image (shared by its rings), driven by the ring
/// worker's thread. librbd runs them on its own threads and reconnects to monitors and OSDs
/// by itself; its completions wake the worker through the worker's eventfd and are answered
/// as local I/O is. A command the cluster does not answer within the retry timeout fails
/// (rados_osd_op_timeout, set when the image was opened).
final class RBDRingClient: NetworkStoreClient {
    /// No answer for this long with commands in flight: the ring counts as waiting on a lost
    /// cluster (`store_waiting_rings`) until the next answer.
    static let stallNanoseconds: UInt64 = 5_000_000_000

    private let image: RBDImage
    private let queue: RBDCompletionQueue
    private let statistics: RingStatistics
    private let logger: Logger
    private var inFlight: [UInt: StoreCommand] = [:]
    private var answered: [IOURing.Completion] = []
    /// The last answer, or the first command sent after an idle spell.
    private var lastProgress: UInt64 = 0
    private var stalled = false

    /// `wakeup` is the worker's eventfd, which outlives every command (the worker stops only
    /// once nothing is in flight).
    init(image: RBDImage, wakeup: Int32, statistics: RingStatistics, logger: Logger) {
        self.image = image
        queue = RBDCompletionQueue(wakeup: wakeup)
        self.statistics = statistics
        self.logger = logger
    }

    // librbd splits a command along the image's objects itself.
    var maxPayload: Int { 1 << 30 }
    var canFlush: Bool { true }

    func submit(_ command: StoreCommand) {
        do throws(RBDError) {
            let cookie = switch command.operation {
            case .read(let buffer, let count): try image.read(into: buffer, count: count, offset: command.offset, queue: queue)
            case .write(let buffer, let count): try image.write(from: buffer, count: count, offset: command.offset, queue: queue)
            case .flush: try image.flush(queue: queue)
            case .discard(let count): try image.discard(count: count, offset: command.offset, queue: queue)
            }
            if inFlight.isEmpty { lastProgress = DispatchTime.now().uptimeNanoseconds }
            inFlight[cookie] = command
        } catch {
            logger.warning("RBD \(image.spec): \(error)")
            answered.append(IOURing.Completion(tag: command.tag, result: -error.errno, more: false))
        }
    }

    /// Wakes the worker once a second while commands are in flight, to notice a cluster that
    /// stopped answering.
    func prepareToWait(_ uring: IOURing, cancellationTag: UInt64) -> Int? {
        if !answered.isEmpty { return 0 }
        guard !inFlight.isEmpty else { return nil }
        if !stalled, DispatchTime.now().uptimeNanoseconds &- lastProgress >= Self.stallNanoseconds {
            stalled = true
            statistics.update { $0.storeWaitingRings = 1 }
            logger.error("RBD \(image.spec): no answer from the cluster for \(Self.stallNanoseconds / 1_000_000_000) s; \(inFlight.count) command(s) wait")
        }
        return 1000
    }

    func pollFired(_ completion: IOURing.Completion) {}
    /// librbd's own threads take the cluster's answers in.
    func drain() {}

    func reap(_ body: (IOURing.Completion) -> Void) {
        var progressed = false
        queue.retire { cookie, result in
            guard let command = inFlight.removeValue(forKey: cookie) else { return }
            progressed = true
            let value = result < 0 ? Int32(clamping: result) : command.successResult
            answered.append(IOURing.Completion(tag: command.tag, result: value, more: false))
        }
        if progressed {
            lastProgress = DispatchTime.now().uptimeNanoseconds
            if stalled {
                stalled = false
                statistics.update { $0.storeWaitingRings = 0 }
                logger.notice("RBD \(image.spec): the cluster answers again")
            }
        }
        guard !answered.isEmpty else { return }
        let finished = answered
        answered.removeAll(keepingCapacity: true)
        for completion in finished { body(completion) }
    }
}
