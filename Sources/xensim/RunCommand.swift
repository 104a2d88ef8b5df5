import ArgumentParser
import Blkif
import Foundation
import Logging
import SimHypervisor
import Xenbus
import XenSim

/// `xensim run --dir DIR [--detach]`: the simulated hypervisor services and xenstored, one
/// process, one event loop.
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run the simulated Xen (xenstored on DIR/xenstored.sock, DIR/dom<N>.sock per introduced domain).",
        discussion: "Writes DIR/xensim.pid once the sockets accept connections; stop it with `xensim stop --dir DIR`."
    )

    @OptionGroup var simulator: SimulatorOptions

    @Flag(help: "Run in the background (log in DIR/xensim.log); return once xenstored accepts connections.")
    var detach = false

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level \(logLevel)") }
    }

    func run() throws {
        let directory = simulator.layout
        do {
            try FileManager.default.createDirectory(atPath: directory.directory, withIntermediateDirectories: true)
        } catch {
            fail("cannot create \(directory.directory): \(error.localizedDescription)")
        }
        if let pid = SimulatorProcess.runningPid(in: directory) {
            fail("a simulator already runs in \(directory.directory) (pid \(pid)); stop it with `xensim stop --dir \(directory.directory)`")
        }
        if detach {
            try startDetached(directory)
        } else {
            try serve(directory)
        }
    }

    /// Starts `xensim run` again (without --detach) in its own session with output to the log,
    /// then waits until it serves. posix_spawn, not fork: a forked Swift process may hold
    /// locks of threads that do not exist in the child.
    private func startDetached(_ directory: SimLayout) throws {
        let arguments = ["xensim", "run", "--dir", directory.directory, "--log-level", logLevel]
        let pid: pid_t
        do {
            pid = try SimulatorProcess.spawnDetached(arguments: arguments, logFile: directory.logFile)
        } catch {
            fail("cannot start the simulator: \(error)")
        }
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid {
                let log = (try? String(contentsOfFile: directory.logFile, encoding: .utf8)) ?? ""
                let lastLine = log.split(separator: "\n").last.map(String.init) ?? "no output"
                fail("the simulator exited at start: \(lastLine) (see \(directory.logFile))")
            }
            if directory.isServing && SimulatorProcess.readPid(directory) == pid {
                print("xensim running in \(directory.directory) (pid \(pid))")
                return
            }
            usleep(20_000)
        }
        kill(pid, SIGKILL)
        fail("the simulator did not accept connections within 30 s (see \(directory.logFile))")
    }

    private func serve(_ directory: SimLayout) throws {
        let level = Logger.Level(rawValue: logLevel)!
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "xensim")
        signal(SIGPIPE, SIG_IGN)
        let loop = EventLoop()
        let server = XenstoredServer(directory: directory, loop: loop)
        let broker: EventChannelBroker
        do {
            broker = try EventChannelBroker(directory: directory.directory)
        } catch {
            fail("cannot start the event-channel broker in \(directory.directory): \(error)")
        }
        loop.register(broker.fileDescriptor) { _ in broker.handleEvents() }
        server.onDomainIntroduced = { domid in try broker.addDomain(domid) }
        server.onDomainReleased = { domid in broker.removeDomain(domid) }
        do {
            try loop.stop(onSignals: [SIGTERM, SIGINT])
            try server.start()
            try SimulatorProcess.writePid(getpid(), to: directory)
        } catch {
            server.shutdown()
            fail("cannot start xenstored in \(directory.directory): \(error)")
        }
        logger.info("xensim running in \(directory.directory) (pid \(getpid()))")
        do {
            try loop.run(tick: broker.tick)
        } catch {
            logger.error("event loop failed: \(error)")
        }
        server.shutdown()
        SimulatorProcess.removePid(directory)
        logger.info("xensim stopped")
    }
}
