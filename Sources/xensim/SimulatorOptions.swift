import ArgumentParser
import Engine
import Foundation
import XenSim

/// `--dir DIR`: the directory that holds one simulator's sockets and state.
struct SimulatorOptions: ParsableArguments {
    @Option(help: "The simulator's directory (as given to `xensim run`).")
    var dir: String

    var xenstoredSocket: String { URL(fileURLWithPath: dir).appendingPathComponent("xenstored.sock").path }

    /// A dom0 xenstore connection to this simulator's xenstored.
    func connectAsDom0() throws -> XenStore {
        setenv("XENSTORED_PATH", xenstoredSocket, 1)
        do {
            return try XenStore()
        } catch {
            throw ValidationError("cannot connect to xenstored at \(xenstoredSocket): \(error); start it with `xensim run --dir \(dir) --detach`")
        }
    }
}

/// Prints a toolstack failure the way xl does: one line on stderr, exit status 1.
func runToolstack(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let failure as Toolstack.Failure {
        FileHandle.standardError.write(Data("xensim: \(failure.description)\n".utf8))
        throw ExitCode.failure
    } catch let error as XenStoreError {
        FileHandle.standardError.write(Data("xensim: \(error.description)\n".utf8))
        throw ExitCode.failure
    }
}
