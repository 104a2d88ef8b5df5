import ArgumentParser
import Blkif
import Foundation
import Xenbus
import XenSim

/// `xensim stop --dir DIR`: SIGTERM to the simulator of DIR, wait for it, clean up its files.
struct StopCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stop",
        abstract: "Stop the simulator running in DIR (SIGTERM, up to 10 s) and remove its sockets."
    )

    @OptionGroup var simulator: SimulatorOptions

    func run() throws {
        let directory = simulator.layout
        guard let pid = SimulatorProcess.runningPid(in: directory) else {
            SimulatorProcess.removeFiles(directory)
            print("xensim is not running in \(directory.directory)")
            return
        }
        kill(pid, SIGTERM)
        if SimulatorProcess.waitForExit(pid, seconds: 10) {
            SimulatorProcess.removeFiles(directory)
            print("xensim stopped (pid \(pid))")
            return
        }
        kill(pid, SIGKILL)
        _ = SimulatorProcess.waitForExit(pid, seconds: 2)
        SimulatorProcess.removeFiles(directory)
        fail("the simulator (pid \(pid)) did not stop within 10 s of SIGTERM and was killed")
    }
}
