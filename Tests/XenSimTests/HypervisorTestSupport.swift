import Engine
import Foundation
import Glibc
import SimHypervisor
import Synchronization
import XenSim

/// A fresh simulator directory (short, for unix socket paths), removed by `remove()`.
final class SimDirectory {
    let path: String

    init() {
        var template = Array("/tmp/hv.XXXXXX".utf8CString)
        path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
    }

    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// Runs a broker on its own thread, as `xensim run`'s poll loop would.
final class BrokerThread: @unchecked Sendable {
    let broker: EventChannelBroker
    private let stopping = Atomic<Bool>(false)
    private let stopped = DispatchSemaphore(value: 0)

    init(directory: String) throws {
        broker = try EventChannelBroker(directory: directory)
        let thread = Thread { [self] in
            while !stopping.load(ordering: .acquiring) {
                var pfd = pollfd(fd: broker.fileDescriptor, events: Int16(POLLIN), revents: 0)
                if poll(&pfd, 1, 20) > 0 { broker.handleEvents() }
            }
            stopped.signal()
        }
        thread.start()
    }

    func stop() {
        stopping.store(true, ordering: .releasing)
        stopped.wait()
    }
}

/// True when `fd` becomes readable within `milliseconds`.
func readable(_ fd: Int32, within milliseconds: Int32) -> Bool {
    var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    return poll(&pfd, 1, milliseconds) > 0
}

/// How many mappings of `path` this process has (from /proc/self/maps).
func mappingCount(of path: String) -> Int {
    // Read to the end: procfs reports a size of 0, and under ThreadSanitizer the table is long.
    let data = (try? FileHandle(forReadingFrom: URL(fileURLWithPath: "/proc/self/maps")).readToEnd()) ?? nil
    let maps = String(decoding: data ?? Data(), as: UTF8.self)
    return maps.split(separator: "\n").filter { $0.hasSuffix(path) }.count
}
