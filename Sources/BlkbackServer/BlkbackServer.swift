import API
import ArgumentParser
import Engine
import Foundation
import Glibc
import Logging
import SimHypervisor

extension Logger.Level: @retroactive ExpressibleByArgument {}
extension BlkbackDataPlane.IOPolicy: ExpressibleByArgument {}

/// The dom0 daemon: serves backend/<kind> VBDs from xenstore.
@main
struct BlkbackServer: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blkback-server",
        abstract: "Userspace Xen block backend (the job of Linux xen-blkback) for dom0.",
        discussion: """
            Serves the VBDs the toolstack creates under /local/domain/<domid>/backend/<kind> and \
            an HTTP API (GET /healthz, /v1/vbds, /v1/vbds/{domid}/{devid}[/stats], /metrics; \
            POST /v1/vbds/{domid}/{devid}/state) described in openapi.yaml.

            ENVIRONMENT
              XENSTORED_PATH    xenstored socket (libxenstore); --sim sets it to DIR/xenstored.sock when unset
              XENSTORED_RUNDIR  directory of xenstored's socket (libxenstore)

            SIGNALS
              SIGTERM  planned restart (systemctl restart): in-flight requests are answered, \
            connected devices stay Connected and their rings' journals stay in --state-dir; the \
            next blkback-server takes them over without the guests noticing.
              SIGINT   shutdown: in-flight requests are answered and every connected device is \
            closed (its guest sees Closed).

            EXIT CODES
              0  stopped by SIGTERM/SIGINT after draining in-flight I/O
              1  xenstored unreachable, watches or the explicitly requested API address failed
              2  bad command line or configuration, unreadable token/TLS files, Xen devices missing
            """,
        version: BlkbackVersion.string)

    @Option(name: .customLong("kind"), help: "A backend/<kind> tree to serve (repeatable): vbd, vbd3, qdisk, ...")
    var kinds: [String] = []

    @Option(help: ArgumentHelp("Address of the HTTP API, HOST:PORT or [IPv6]:PORT (default 127.0.0.1:8080); a non-loopback address requires --token-file.",
                               valueName: "host:port"))
    var listen: String?

    @Option(help: ArgumentHelp("Use the simulator whose state lives in DIR (xensim run --dir DIR).", valueName: "dir"))
    var sim: String?

    @Option(help: ArgumentHelp("File holding the bearer token the HTTP API requires (Authorization: Bearer <token>; /healthz is open).",
                               valueName: "file"))
    var tokenFile: String?

    @Option(help: ArgumentHelp("PEM certificate (chain) for HTTPS on the API; needs --tls-key.", valueName: "pem-file"))
    var tlsCert: String?

    @Option(help: ArgumentHelp("PEM private key for HTTPS on the API; needs --tls-cert.", valueName: "pem-file"))
    var tlsKey: String?

    @Flag(help: "Serve plain HTTP on a non-loopback --listen address (the bearer token then travels in clear); without it such an address needs --tls-cert/--tls-key.")
    var insecureHttp = false

    @Option(help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: Logger.Level = .info

    @Option(help: "multi-queue-max-queues advertised to frontends (default: number of CPUs).")
    var maxQueues: Int = ProcessInfo.processInfo.activeProcessorCount

    @Option(help: "max-ring-page-order advertised to frontends (0...4).")
    var maxRingPageOrder: Int = 4

    @Option(help: "feature-max-indirect-segments advertised to frontends (0 = no indirect requests).")
    var maxIndirectSegments: Int = 256

    @Flag(inversion: .prefixedNo, help: "Offer persistent grants (feature-persistent): a frontend that uses them has its pages mapped once, not per request.")
    var persistentGrants = true

    @Option(help: "Grants each ring keeps mapped with persistent grants (least recently used purged first; 0...65536).")
    var maxPersistentGrants: Int = BackendConfiguration.defaultMaxPersistentGrants

    @Option(help: ArgumentHelp("""
        Grant pages one guest may have mapped at once over all its VBDs (each takes one of \
        dom0's maptrack entries); more travel by grant copy (64...1048576).
        """, valueName: "pages"))
    var maxGrantsPerDomain: Int = BlkbackDataPlane.defaultMaxGrantsPerDomain

    @Option(help: ArgumentHelp("""
        Seconds an NBD server or Ceph cluster has to answer when a device is opened; one that \
        does not fails the device as a missing file would.
        """, valueName: "seconds"))
    var storeConnectTimeout: Double = 10

    @Option(help: ArgumentHelp("""
        Seconds requests wait while a lost NBD server is reconnected or an RBD image's cluster \
        does not answer; then they fail with an error (reconnecting goes on, and later \
        requests are served once it succeeds).
        """, valueName: "seconds"))
    var storeRetryTimeout: Double = BlkbackDataPlane.defaultStoreRetryTimeout

    @Option(help: ArgumentHelp("""
        Microseconds a ring's thread may spin on its ring and completions before it sleeps; the \
        spin adapts to the load, up to this (0: never; 0...1000). Saves a wakeup per request \
        burst at the price of CPU time while a busy ring waits.
        """, valueName: "us"))
    var ringPollMax: Int = BlkbackDataPlane.defaultMaxPollMicroseconds

    @Option(help: ArgumentHelp("""
        How guest pages not kept mapped by persistent grants reach the disk: auto (direct I/O; \
        grant copy where gntdev may unmap after the answer, as on real Xen), direct-copy (always \
        grant copy), buffered (dom0's page cache).
        """, valueName: "mode"))
    var ioMode: BlkbackDataPlane.IOPolicy = .auto

    @Option(help: ArgumentHelp("""
        Where each ring's journal lives, so that the next daemon takes connected devices over \
        after a restart or a crash; kept across restarts, not across reboots (default \
        /run/blkback-server; with --sim, DIR/blkback-server).
        """, valueName: "dir"))
    var stateDir: String?

    @Option(help: "The domain this backend runs in.")
    var domid: UInt32 = 0

    @Option(help: "GET /v1/events streams open at once (each parks its connection, holding no thread); one more gets 503.")
    var maxEventStreams: Int = 1024

    @Option(help: ArgumentHelp("Seconds between heartbeat comments on an idle event stream.", valueName: "seconds"))
    var eventHeartbeat: Double = 15

    @Option(help: "Events queued for one event stream whose client does not keep up; one more cuts it off.")
    var eventQueue: Int = 1024

    func run() throws {
        let options = validatedOptions()
        if let sim, getenv("XENSTORED_PATH") == nil {
            setenv("XENSTORED_PATH", sim + "/xenstored.sock", 1)
        }
        let logger = bootstrapLogging()
        // Block the stop signals before any thread starts, so every thread inherits the mask
        // and only sigwait in serve receives them.
        var stopSignals = sigset_t()
        sigemptyset(&stopSignals)
        sigaddset(&stopSignals, SIGTERM)
        sigaddset(&stopSignals, SIGINT)
        pthread_sigmask(SIG_BLOCK, &stopSignals, nil)

        let daemon = wire(options, logger: logger)
        serve(daemon, options, stopSignals: stopSignals, logger: logger)
    }

    /// What the flags ask for, checked: nothing is started yet.
    private struct Options {
        var configuration: BackendConfiguration
        var address: ListenAddress
        var token: BearerToken?
        var tls: (certificate: String, key: String)?
    }

    /// The parts `serve` starts and stops.
    private struct Daemon {
        var manager: BackendManager
        var server: HTTPServer
    }

    // MARK: options

    /// Checks the flags and reads the token and TLS files; exits with 2 on the first problem.
    private func validatedOptions() -> Options {
        let configuration = BackendConfiguration(
            domid: domid, kinds: kinds.isEmpty ? ["vbd"] : kinds, maxQueues: maxQueues,
            maxRingPageOrder: maxRingPageOrder, maxIndirectSegments: maxIndirectSegments,
            persistentGrants: persistentGrants, maxPersistentGrants: maxPersistentGrants,
            storeConnectTimeout: storeConnectTimeout, storeRetryTimeout: storeRetryTimeout)
        if let problem = configuration.validationError { fail(problem, code: 2) }
        guard (64...1_048_576).contains(maxGrantsPerDomain) else {
            fail("--max-grants-per-domain must be 64...1048576, got \(maxGrantsPerDomain)", code: 2)
        }
        guard (0...1000).contains(ringPollMax) else { fail("--ring-poll-max must be 0...1000 microseconds, got \(ringPollMax)", code: 2) }
        guard (1...65536).contains(maxEventStreams) else { fail("--max-event-streams must be 1...65536, got \(maxEventStreams)", code: 2) }
        guard (1...1_048_576).contains(eventQueue) else { fail("--event-queue must be 1...1048576, got \(eventQueue)", code: 2) }
        guard eventHeartbeat >= 0.1, eventHeartbeat <= 3600 else {
            fail("--event-heartbeat must be 0.1...3600 seconds, got \(eventHeartbeat)", code: 2)
        }

        let address: ListenAddress
        do {
            address = try ListenAddress(listen ?? "127.0.0.1:8080")
        } catch {
            fail(error.description, code: 2)
        }
        var token: BearerToken?
        if let tokenFile {
            var info = stat()
            guard stat(tokenFile, &info) == 0 else {
                fail("cannot read the token file \(tokenFile): \(String(cString: strerror(errno))); write the bearer token into it", code: 2)
            }
            // A secret others can read is no secret: as ssh does for its keys.
            guard info.st_mode & 0o077 == 0, info.st_uid == getuid() || info.st_uid == 0 else {
                fail("token file \(tokenFile) is readable by others or not ours (mode \(String(info.st_mode & 0o777, radix: 8)), owner \(info.st_uid)); chown it to this user and chmod 600 it", code: 2)
            }
            guard let text = try? String(contentsOfFile: tokenFile, encoding: .utf8), let read = BearerToken(text) else {
                fail("cannot read a token from \(tokenFile); write the bearer token into it", code: 2)
            }
            token = read
        }
        if !address.isLoopback, token == nil {
            fail("refusing to listen on non-loopback \(address) without --token-file", code: 2)
        }
        let tls = tlsFiles()
        if !address.isLoopback, tls == nil, !insecureHttp {
            fail("refusing plain HTTP on non-loopback \(address): give --tls-cert and --tls-key, or --insecure-http to send the token in clear", code: 2)
        }
        return Options(configuration: configuration, address: address, token: token, tls: tls)
    }

    /// The PEM certificate and key of --tls-cert/--tls-key; nil for plain HTTP.
    private func tlsFiles() -> (certificate: String, key: String)? {
        switch (tlsCert, tlsKey) {
        case (nil, nil):
            return nil
        case (let cert?, let key?):
            guard let certificate = try? String(contentsOfFile: cert, encoding: .utf8) else { fail("cannot read the TLS certificate \(cert)", code: 2) }
            guard let keyText = try? String(contentsOfFile: key, encoding: .utf8) else { fail("cannot read the TLS key \(key)", code: 2) }
            guard HTTPServer.supportsTLS else { fail("this libmicrohttpd was built without TLS; drop --tls-cert/--tls-key", code: 2) }
            return (certificate, keyText)
        default:
            fail("--tls-cert and --tls-key go together", code: 2)
        }
    }

    private func bootstrapLogging() -> Logger {
        let level = logLevel
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        return Logger(label: "blkback")
    }

    // MARK: wiring

    /// Hypervisor services, xenstore, the control plane over the data plane, and the HTTP API
    /// in front of it; nothing started yet. Exits with 2 without Xen devices, 1 without xenstored.
    private func wire(_ options: Options, logger: Logger) -> Daemon {
        // Grants and event channels first: without them (no Xen, modules not loaded) nothing
        // can be served, and that is the message an operator needs.
        let services: HypervisorServices
        do {
            services = try sim.map { try .simulator(directory: $0, localDomain: domid) } ?? .xen()
        } catch {
            fail("\(error)", code: 2)
        }
        let journals = stateDir ?? sim.map { $0 + "/blkback-server" } ?? "/run/blkback-server"
        guard mkdir(journals, 0o700) == 0 || errno == EEXIST else {
            fail("cannot create the state directory \(journals): \(String(cString: strerror(errno))); choose one with --state-dir", code: 2)
        }
        let dataPlane = BlkbackDataPlane(services: services, policy: ioMode, journalDirectory: journals,
                                         maxGrantsPerDomain: maxGrantsPerDomain, storeRetryTimeout: storeRetryTimeout,
                                         maxPollMicroseconds: ringPollMax, logger: Logger(label: "blkback.data"))

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
            manager = try BackendManager(configuration: options.configuration, store: store, dataPlane: dataPlane, logger: logger)
        } catch {
            fail("cannot start the control plane: \(error)", code: 1)
        }

        var events = EventStreams.Configuration()
        events.maximumStreams = maxEventStreams
        events.heartbeatSeconds = eventHeartbeat
        events.queueCapacity = eventQueue
        let api = ManagementAPI(backend: manager, token: options.token, events: events)
        var serverConfiguration = HTTPServer.Configuration(address: options.address, tls: options.tls)
        serverConfiguration.maximumBodySize = 64 * 1024
        // Event streams stay open; the other requests keep slots of their own.
        serverConfiguration.connectionLimit = maxEventStreams + 64
        raiseDescriptorLimit(to: serverConfiguration.connectionLimit + 256, logger: logger)
        let server = HTTPServer(configuration: serverConfiguration, logger: Logger(label: "blkback.api"),
                                errorResponse: { status, message in ManagementAPI.errorResponse(status, message) },
                                handler: { request in api.respond(request) })
        return Daemon(manager: manager, server: server)
    }

    // MARK: serving

    /// Starts the API, then the control plane; waits for SIGTERM/SIGINT (blocked in
    /// `stopSignals`); stops the API, then the control plane.
    ///
    /// Why not swift-service-lifecycle: its ServiceGroup runs async services and cancels
    /// them on a signal; nothing here is async (the control plane and the ring workers are
    /// threads, libmicrohttpd has its own), and the order of the stop matters (API first, then
    /// the control plane's drain, which writes Closed only once rings are released). One
    /// sigwait on signals blocked before any thread starts gives that order without a
    /// concurrency runtime between the signal and the drain.
    private func serve(_ daemon: Daemon, _ options: Options, stopSignals: sigset_t, logger: Logger) {
        let (server, manager, configuration) = (daemon.server, daemon.manager, options.configuration)
        // The API before the devices: an address that cannot be had fails before any device
        // is touched (/healthz says 503 until the control plane watches).
        do {
            try server.start()
            logger.info("HTTP API listening on \(options.tls == nil ? "http" : "https")://\(options.address)\(options.token == nil ? "" : " (bearer token required)")")
        } catch {
            // An address asked for must work; the default one being taken (another daemon,
            // a test) leaves the block devices served and says so.
            guard listen == nil else { fail("\(error); pick another --listen address", code: 1) }
            logger.error("HTTP API not served: \(error); pass --listen to choose another address")
        }

        do {
            try manager.start()
        } catch {
            server.stop()
            fail("cannot watch \(configuration.backendRoot(kind: configuration.kinds[0])): \(error)", code: 1)
        }
        logger.info("""
            serving \(configuration.kinds.map { "backend/\($0)" }.joined(separator: ", ")) of domain \(domid) \
            through xenstored at \(XenStore.socketDescription); max-queues \(maxQueues), \
            max-ring-page-order \(maxRingPageOrder), max-indirect-segments \(maxIndirectSegments), \
            persistent grants \(persistentGrants ? "offered (at most \(maxPersistentGrants) mapped per ring)" : "not offered")
            """)

        var signals = stopSignals
        var received: Int32 = 0
        sigwait(&signals, &received)
        let handingOver = received == SIGTERM
        logger.info("received signal \(received); \(handingOver ? "leaving connected devices to the next daemon" : "closing every device")")
        // The API first: no new commands reach a control plane that is closing devices.
        server.stop()
        manager.stop(handingOver: handingOver)
        // Everything the frontends need is written; what is left (the xenstore connection and
        // its watch thread, which libxenstore would cancel in xs_close) goes with the process.
        logger.info("stopped")
        Foundation.exit(0)
    }

    /// Open connections each hold a descriptor: lift the soft limit (1024 by default) toward
    /// the hard one so that the API's connection limit, not EMFILE, is what a client meets.
    private func raiseDescriptorLimit(to wanted: Int, logger: Logger) {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < rlim_t(wanted) else { return }
        let target = min(rlim_t(wanted), limit.rlim_max)
        limit.rlim_cur = target
        if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) != 0 || target < rlim_t(wanted) {
            logger.warning("open files limited to \(target), below the \(wanted) the API's connections may need; raise LimitNOFILE")
        }
    }

    /// One line on stderr and the exit code: what failed and what to do.
    private func fail(_ message: String, code: Int32) -> Never {
        FileHandle.standardError.write(Data("blkback-server: \(message)\n".utf8))
        Foundation.exit(code)
    }
}
