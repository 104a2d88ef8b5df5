import ArgumentParser
import Blkif
import Foundation
import Glibc
import Xenbus
import XenSim

extension WorkloadKind: ExpressibleByArgument {}
extension ReadCheck: ExpressibleByArgument {}

struct FrontendCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "frontend",
        abstract: "Be domain N's xen-blkfront for one VBD and run a verified workload on it.",
        discussion: """
            Negotiates through the guest's own xenstore socket (DIR/dom<N>.sock) like Linux \
            xen-blkfront: rings and event channels in one transaction, Initialised, then Connected \
            once the backend is. Requests above the backend's offers are clamped (queues, ring \
            page order, indirect segments). With persistent grants (the default, when the \
            backend offers them) each ring keeps a pool of pages granted once and copies data \
            through them, as blkfront does; --no-persistent grants pages per request.

            Every written 512-byte sector carries its sector number, a generation and a pattern \
            derived from both; every read is checked (what this run last wrote there, else zeros \
            or an earlier run's stamp). `verify` writes the region with new generations, flushes, \
            and reads it back (with --seconds, pass after pass until time is up). Without --seconds \
            or --bytes a workload makes one pass over the region.

            If the backend closes the device mid-run, the frontend closes its side (Closed), and \
            with --reconnect (the default) negotiates again when the backend offers the device, \
            re-issuing the requests it never answered; --no-reconnect ends the run with an error, \
            as a Linux guest's disk would die. SIGINT/SIGTERM stop the workload, wait for \
            in-flight requests and close the device (Closing, Closed, grants ended).

            Exit status: 0 all I/O succeeded and verified; 1 an I/O error, a verification \
            failure or the device lost mid-run; 2 the device could not be connected or the \
            workload does not fit it (one line on stderr).
            """
    )

    @OptionGroup var simulator: SimulatorOptions
    @Option(help: "The guest domain.") var domid: UInt32
    @Option(help: "The virtual device number (51712 = xvda).") var devid: UInt32
    @Option(help: "The device kind (device/<kind>/...).") var kind: String = "vbd"

    @Option(help: "randread, randwrite, read, write, randrw, verify or discard.") var workload: WorkloadKind = .randread
    @Option(help: "Bytes per request, a multiple of 512 (suffixes k, m).") var bs: String = "4096"
    @Option(help: "Requests in flight at most (clamped to the ring slots).") var qd: Int = 32
    @Option(help: "Stop issuing after this many seconds.") var seconds: Double?
    @Option(help: "Stop issuing after this many bytes (suffixes k, m, g).") var bytes: String?
    @Option(help: "Start of the region used, in bytes (a multiple of --bs).") var offset: String = "0"
    @Option(help: "Size of the region used, in bytes (default: to the end of the disk).") var size: String?
    @Option(help: "randrw: percentage of reads.") var readPercent: Int = 50
    @Option(help: "Flush after every N writes (0: never; verify always flushes after writing).") var flushEvery: Int = 0
    @Flag(help: "Sectors this run did not write must hold an earlier run's stamp (zeros count as failures).")
    var verifyExisting = false
    @Option(help: "Sectors of each read checked: all, or sample (the first of every 4 KiB page and the last; for benchmarks).")
    var verifySectors: ReadCheck = .all
    @Option(help: "Seed of the random offsets (default: the start time).") var seed: UInt64?

    @Option(help: "Queues (rings) to ask for; clamped to multi-queue-max-queues.") var queues: Int = 1
    @Option(help: "Ring page order to ask for; clamped to max-ring-page-order.") var ringPageOrder: Int = 0
    @Flag(inversion: .prefixedNo, help: "Ask for persistent grants (feature-persistent).")
    var persistent = true
    @Flag(help: "Do not use indirect segments even if the backend offers them.") var noIndirect = false
    @Option(help: "Most segments per indirect request (blkfront's max_indirect_segments).")
    var maxIndirectSegments: Int = 32
    @Option(help: "Ring ABI: native, x86_32 or x86_64.") var `protocol`: String = "native"
    @Flag(inversion: .prefixedNo, help: "Negotiate again when the backend closes and offers the device anew.")
    var reconnect = true
    @Option(help: "Seconds to wait for each backend step while connecting.") var timeout: Double = 10
    @Option(help: "Seconds to wait for the backend to come back after it closed.") var reconnectTimeout: Double = 60
    @Option(help: "Seconds without any answer, with requests in flight, before the run fails (Linux blkfront waits forever).")
    var responseTimeout: Double = 30

    @Flag(help: "Print one JSON object instead of a summary.") var json = false

    func validate() throws {
        guard qd >= 1 else { throw ValidationError("--qd must be at least 1") }
        guard (1...32).contains(queues) else { throw ValidationError("--queues must be within 1...32") }
        guard (0...4).contains(ringPageOrder) else { throw ValidationError("--ring-page-order must be within 0...4") }
        guard (0...Blkif.maxIndirectSegments).contains(maxIndirectSegments) else {
            throw ValidationError("--max-indirect-segments must be within 0...\(Blkif.maxIndirectSegments)")
        }
        guard ringProtocol != nil else { throw ValidationError("--protocol must be native, x86_32 or x86_64") }
        if let seconds { guard seconds > 0 else { throw ValidationError("--seconds must be positive") } }
        guard (1...100).contains(readPercent) else { throw ValidationError("--read-percent must be within 1...100") }
        guard flushEvery >= 0 else { throw ValidationError("--flush-every must be 0 or more") }
        guard timeout > 0, reconnectTimeout > 0, responseTimeout > 0 else { throw ValidationError("timeouts must be positive") }
        let blockSize = try size(bs, "--bs")
        guard blockSize > 0, blockSize % 512 == 0, blockSize <= UInt64(Blkif.maxIndirectSegments * Blkif.pageSize) else {
            throw ValidationError("--bs must be a multiple of 512 up to \(Blkif.maxIndirectSegments * Blkif.pageSize)")
        }
        _ = try bytes.map { try size($0, "--bytes") }
        _ = try size(offset, "--offset")
        _ = try self.size.map { try size($0, "--size") }
    }

    private var ringProtocol: BlkifProtocol? {
        switch `protocol` {
        case "native": .native
        case "x86_32", "x86_32-abi": .x86_32
        case "x86_64", "x86_64-abi": .x86_64
        default: nil
        }
    }

    private func size(_ text: String, _ option: String) throws -> UInt64 {
        do { return try ByteSize.parse(text) } catch { throw ValidationError("\(option): \(error)") }
    }

    func run() throws {
        // Stop signals are taken by the run loop; block them before any thread exists so
        // every thread (libxenstore's reader too) inherits the mask.
        var stopSignals = sigset_t()
        sigemptyset(&stopSignals)
        sigaddset(&stopSignals, SIGINT)
        sigaddset(&stopSignals, SIGTERM)
        pthread_sigmask(SIG_BLOCK, &stopSignals, nil)

        var workloadConfiguration = WorkloadConfiguration(kind: workload, blockSize: Int(try size(bs, "--bs")), queueDepth: qd)
        workloadConfiguration.seconds = seconds
        workloadConfiguration.bytes = try bytes.map { try size($0, "--bytes") }
        workloadConfiguration.offset = try size(offset, "--offset")
        workloadConfiguration.size = try self.size.map { try size($0, "--size") }
        workloadConfiguration.readPercent = readPercent
        workloadConfiguration.flushEvery = flushEvery
        workloadConfiguration.verifyExisting = verifyExisting
        workloadConfiguration.readCheck = verifySectors
        workloadConfiguration.seed = seed
        var configuration = FrontendConfiguration(workload: workloadConfiguration)
        configuration.device.queues = queues
        configuration.device.ringPageOrder = ringPageOrder
        configuration.device.persistentGrants = persistent
        configuration.device.indirect = !noIndirect
        configuration.device.maxIndirectSegments = maxIndirectSegments
        configuration.device.protocol = ringProtocol ?? .native
        configuration.device.timeout = timeout
        configuration.reconnect = reconnect
        configuration.reconnectTimeout = reconnectTimeout
        configuration.responseTimeout = responseTimeout

        let frontendRun: FrontendRun
        do {
            // The guest's own socket: every request carries domain N's permissions.
            let socket = URL(fileURLWithPath: simulator.dir).appendingPathComponent("dom\(domid).sock").path
            setenv("XENSTORED_PATH", socket, 1)
            let store: XenStore
            do {
                store = try XenStore()
            } catch {
                throw FrontendFailure("cannot connect to domain \(domid)'s xenstore socket \(socket): \(error); is `xensim run --dir \(simulator.dir)` running and the domain created?")
            }
            let device = try Blockfront(store: store, directory: simulator.dir, domid: domid, devid: devid, kind: kind,
                                        options: configuration.device)
            frontendRun = try FrontendRun(device: device, configuration: configuration, log: frontendLog)
        } catch {
            frontendLog("\(error)")
            throw ExitCode(2)
        }

        let report = frontendRun.run {
            var none = timespec(tv_sec: 0, tv_nsec: 0)
            return sigtimedwait(&stopSignals, nil, &none) > 0
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            print(summary(report))
        }
        if let error = report.error { frontendLog(error) }
        if !report.succeeded { throw ExitCode.failure }
    }

    private func summary(_ r: FrontendReport) -> String {
        var lines = [String(format: "%@ bs=%d qd=%d: %llu ops in %.2f s, %.0f IOPS, %.1f MiB/s, latency p50 %.0f us, p99 %.0f us, p99.9 %.0f us",
                            r.workload.rawValue, r.bs, r.qd, r.ops, r.seconds, r.iops, r.mibPerS,
                            r.latUs.p50, r.latUs.p99, r.latUs.p999),
                     "reads \(r.reads), writes \(r.writes), flushes \(r.flushes), \(ByteSize.describe(r.bytes)); errors \(r.errors), verify failures \(r.verifyFailures), reconnects \(r.reconnects)\(r.interrupted ? " (interrupted)" : "")"]
        if let n = r.negotiated {
            let features = [("flush", n.features.flush), ("barrier", n.features.barrier), ("discard", n.features.discard)]
                .map { "\($0.0) \($0.1 ? "yes" : "no")" }.joined(separator: ", ")
            lines.append("device \(n.backendPath): \(n.sectors) sectors (sector size \(n.sectorSize))\(n.readOnly ? ", read-only" : ""); \(n.protocol), \(n.queues) queue(s), ring page order \(n.ringPageOrder) (\(n.ringSize) slots), indirect segments \(n.indirectSegments), persistent grants \(n.persistentGrants ? "yes" : "no"); \(features)")
        }
        return lines.joined(separator: "\n")
    }
}

let frontendLog: @Sendable (String) -> Void = { message in
    FileHandle.standardError.write(Data("xensim frontend: \(message)\n".utf8))
}
