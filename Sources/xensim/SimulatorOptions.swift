import ArgumentParser
import Blkif
import Foundation
import SimHypervisor
import Xenbus
import XenSim

/// `--dir DIR`: the directory that holds one simulator's sockets and state.
struct SimulatorOptions: ParsableArguments {
    @Option(help: "The simulator's directory (as given to `xensim run`).")
    var dir: String

    var layout: SimLayout { SimLayout(directory: URL(fileURLWithPath: dir).standardizedFileURL.path) }

    /// A dom0 xenstore connection to this simulator's xenstored.
    func connectAsDom0() -> XenStore {
        setenv("XENSTORED_PATH", layout.xenstoredSocket, 1)
        do {
            return try XenStore()
        } catch {
            fail("cannot connect to xenstored at \(layout.xenstoredSocket): \(error); start it with `xensim run --dir \(dir) --detach`")
        }
    }
}

/// Prints a toolstack failure the way xl does: one line on stderr, exit status 1.
func runToolstack(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let failure as Toolstack.Failure {
        fail(failure.description)
    } catch let error as XenStoreError {
        fail(error.description)
    }
}

/// One line on stderr and exit status 1, the way every xensim verb reports a failure.
func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("xensim: \(message)\n".utf8))
    Foundation.exit(1)
}
