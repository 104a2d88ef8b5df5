import ArgumentParser
import Engine
import Foundation
import Glibc
import Logging

extension Logger.Level: @retroactive ExpressibleByArgument {}

/// The dom0 daemon: serves backend/<kind> VBDs from xenstore.
@main
struct BlkbackServer: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blkback-server",
        abstract: "Userspace Xen block backend (the job of Linux xen-blkback) for dom0.")

    @Option(name: .customLong("kind"), help: "A backend/<kind> tree to serve (repeatable): vbd, vbd3, qdisk, ...")
    var kinds: [String] = []

    @Option(help: "Address of the HTTP API, HOST:PORT.")
    var listen: String?

    @Option(help: "Use the simulator whose state lives in DIR (xensim run --dir DIR).")
    var sim: String?

    @Option(help: "File holding the bearer token the HTTP API requires.")
    var tokenFile: String?

    @Option(help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: Logger.Level = .info

    @Option(help: "multi-queue-max-queues advertised to frontends (default: number of CPUs).")
    var maxQueues: Int = ProcessInfo.processInfo.activeProcessorCount

    @Option(help: "max-ring-page-order advertised to frontends (0...4).")
    var maxRingPageOrder: Int = 4

    @Option(help: "feature-max-indirect-segments advertised to frontends (0 = no indirect requests).")
    var maxIndirectSegments: Int = 256

    @Flag(inversion: .prefixedNo, help: "Offer persistent grants (feature-persistent).")
    var persistentGrants = true

    @Option(help: "The domain this backend runs in.")
    var domid: UInt32 = 0

    func run() throws {
        let configuration = BackendConfiguration(
            domid: domid, kinds: kinds.isEmpty ? ["vbd"] : kinds, maxQueues: maxQueues,
            maxRingPageOrder: maxRingPageOrder, maxIndirectSegments: maxIndirectSegments,
            persistentGrants: persistentGrants)
        if let problem = configuration.validationError { fail(problem, code: 2) }

        // The HTTP API comes later; the address is checked now so a bad one fails at start.
        let address: ListenAddress?
        do {
            address = try listen.map { text throws(ListenAddressError) in try ListenAddress(text) }
        } catch {
            fail(error.description, code: 2)
        }
        if let tokenFile, (try? String(contentsOfFile: tokenFile, encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines).isEmpty ?? true {
            fail("cannot read a token from \(tokenFile); write the bearer token into it", code: 2)
        }
        if let address, !address.isLoopback, tokenFile == nil {
            fail("refusing to listen on non-loopback \(address) without --token-file", code: 2)
        }

        if let sim, getenv("XENSTORED_PATH") == nil {
            setenv("XENSTORED_PATH", sim + "/xenstored.sock", 1)
        }

        let level = logLevel
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "blkback")

        // Block the stop signals before any thread starts, so every thread inherits the mask
        // and only sigwait below receives them.
        var stopSignals = sigset_t()
        sigemptyset(&stopSignals)
        sigaddset(&stopSignals, SIGTERM)
        sigaddset(&stopSignals, SIGINT)
        pthread_sigmask(SIG_BLOCK, &stopSignals, nil)

        // Grants and event channels first: without them (no Xen, modules not loaded) nothing
        // can be served, and that is the message an operator needs.
        let services: HypervisorServices
        do {
            services = try HypervisorServices.open(simulatorDirectory: sim, localDomain: domid)
        } catch {
            fail("\(error)", code: 2)
        }
        let dataPlane = BlkbackDataPlane(services: services, logger: Logger(label: "blkback.data"))

        let store: XenStore
        do {
            store = try XenStore()
        } catch {
            let reason = (error as? XenStoreError).map { String(cString: strerror($0.errno)) } ?? "\(error)"
            fail("cannot connect to xenstored at \(XenStore.socketDescription): \(reason); "
                 + "start xenstored (or xensim run) or set XENSTORED_PATH", code: 1)
        }

        let manager: BackendManager
        do {
            manager = try BackendManager(configuration: configuration, store: store, dataPlane: dataPlane, logger: logger)
            try manager.start()
        } catch {
            fail("cannot watch \(configuration.backendRoot(kind: configuration.kinds[0])): \(error)", code: 1)
        }
        logger.info("""
            serving \(configuration.kinds.map { "backend/\($0)" }.joined(separator: ", ")) of domain \(domid) \
            through xenstored at \(XenStore.socketDescription); max-queues \(maxQueues), \
            max-ring-page-order \(maxRingPageOrder), max-indirect-segments \(maxIndirectSegments), \
            persistent grants not implemented (feature-persistent=0)\
            \(address.map { "; HTTP API \($0) not served yet" } ?? "")
            """)

        var received: Int32 = 0
        sigwait(&stopSignals, &received)
        logger.info("received signal \(received); stopping")
        manager.stop()
    }

    /// One line on stderr and the exit code: what failed and what to do.
    private func fail(_ message: String, code: Int32) -> Never {
        FileHandle.standardError.write(Data("blkback-server: \(message)\n".utf8))
        Foundation.exit(code)
    }
}
