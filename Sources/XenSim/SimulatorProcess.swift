import Blkif
import Foundation
import Glibc
import Hypervisor
import SimHypervisor
import Xenbus

/// The `xensim run` process of a simulator directory: its pid file, starting it detached,
/// finding and stopping it.
public enum SimulatorProcess {
    public static func readPid(_ directory: SimLayout) -> pid_t? {
        guard let text = try? String(contentsOfFile: directory.pidFile, encoding: .utf8) else { return nil }
        return pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// Written atomically, so a reader never sees half a number.
    public static func writePid(_ pid: pid_t, to directory: SimLayout) throws {
        try "\(pid)\n".write(toFile: directory.pidFile, atomically: true, encoding: .utf8)
    }

    /// Removes the pid file if it still names this process.
    public static func removePid(_ directory: SimLayout) {
        if readPid(directory) == getpid() { unlink(directory.pidFile) }
    }

    /// The pid of a live `xensim run` for this directory; nil when the pid file is missing,
    /// or names a dead process or one that is not xensim (a stale file after a crash).
    public static func runningPid(in directory: SimLayout) -> pid_t? {
        guard let pid = readPid(directory), pid > 0, isAlive(pid) else { return nil }
        guard let cmdline = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return nil }
        let arguments = cmdline.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        return arguments.contains("run") && arguments.contains(directory.directory) ? pid : nil
    }

    /// Alive and not a zombie waiting for its parent.
    static func isAlive(_ pid: pid_t) -> Bool {
        guard kill(pid, 0) == 0 || errno == EPERM else { return false }
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return true }
        return stat[stat.index(close, offsetBy: 2)] != "Z"
    }

    public static func waitForExit(_ pid: pid_t, seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if !isAlive(pid) { return true }
            usleep(20_000)
        }
        return !isAlive(pid)
    }

    /// Removes the sockets and the pid file a stopped simulator left behind.
    public static func removeFiles(_ directory: SimLayout) {
        for socket in directory.socketFiles() { unlink(socket) }
        unlink(directory.pidFile)
    }

    /// Runs this executable (/proc/self/exe) with `arguments` in a new session, stdin from
    /// /dev/null and stdout/stderr appended to `logFile`.
    public static func spawnDetached(arguments: [String], logFile: String) throws -> pid_t {
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        posix_spawnattr_setsigmask(&attributes, &noSignals)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGTERM, SIGINT, SIGPIPE, SIGHUP] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        // POSIX_SPAWN_SETSID (glibc's value; the macro is not imported into Swift).
        let setsid: Int16 = 0x80
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF) | setsid)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logFile, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)

        // Descriptors this process inherited (say, the pipes of whoever started it) must not
        // live on in the daemon, or that starter would wait for their EOF forever.
        for name in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
            if let descriptor = Int32(name), descriptor > 2 { _ = fcntl(descriptor, F_SETFD, FD_CLOEXEC) }
        }
        var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { for argument in argv { free(argument) } }
        var pid: pid_t = 0
        let result = posix_spawn(&pid, "/proc/self/exe", &actions, &attributes, &argv, environ)
        guard result == 0 else { throw SystemCallError(operation: "posix_spawn /proc/self/exe", errno: result) }
        return pid
    }
}
