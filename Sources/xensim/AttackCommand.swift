import ArgumentParser
import Blkif
import Foundation
import Glibc
import Xenbus
import XenSim

struct AttackCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "attack",
        abstract: "Be a malicious domain N against one VBD and check the backend's answer.",
        discussion: """
            The guest negotiates like xen-blkfront through its own xenstore socket (DIR/dom<N>.sock) \
            as far as the attack needs, does the bad thing (malformed requests, grants it may not \
            use, impossible ring indices, state flips, floods...), and watches the answer on the \
            ring and in xenstore. Most attacks end by closing the device, negotiating again and \
            running a small verified workload, so a backend that stopped serving fails them.

            Exit status: 0 the backend behaved as specified; 1 it did not (one line on stderr \
            saying what it did instead); 2 the attack could not be set up (no such device, \
            wrong mode, simulator not running).
            """
    )

    @Option(help: "The simulator's directory (as given to `xensim run`).") var dir: String?
    @Option(help: "The guest domain.") var domid: UInt32?
    @Option(help: "The virtual device number (51712 = xvda).") var devid: UInt32?
    @Option(help: "The device kind (device/<kind>/...).") var kind: String = "vbd"
    @Option(help: "The attack (see --list).") var name: String?
    @Option(help: "How long storms and floods last, in seconds.") var seconds: Double = 3
    @Option(help: "Seconds the backend may take to answer a request or change state.") var timeout: Double = 5
    @Option(help: "Queues (rings) to ask for; the attacks use the first, event-storm all.") var queues: Int = 1
    @Option(help: "Ring page order to ask for (0...4).") var ringPageOrder: Int = 0
    @Option(help: "The ring ABI to write: x86_32-abi, x86_64-abi or native.") var `protocol`: String = "native"
    @Flag(help: "Print the attacks' names, one a line, and exit.") var list = false
    @Flag(help: "With --list: the name, a tab, and what the attack checks.") var describe = false

    func validate() throws {
        if list { return }
        guard dir != nil, domid != nil, devid != nil, let name else {
            throw ValidationError("--dir, --domid, --devid and --name are required (or --list)")
        }
        guard Attack.named(name) != nil else {
            throw ValidationError("no attack named '\(name)'; `xensim attack --list` names them")
        }
        guard seconds > 0, timeout > 0 else { throw ValidationError("--seconds and --timeout must be positive") }
        guard (1...16).contains(queues), (0...4).contains(ringPageOrder) else {
            throw ValidationError("--queues must be 1...16 and --ring-page-order 0...4")
        }
        guard `protocol` == "native" || BlkifProtocol(xenstoreValue: `protocol`) != nil else {
            throw ValidationError("--protocol must be x86_32-abi, x86_64-abi or native")
        }
    }

    func run() throws {
        if list {
            for attack in Attack.all { print(describe ? "\(attack.name)\t\(attack.summary)" : attack.name) }
            return
        }
        guard let dir, let domid, let devid, let name, let attack = Attack.named(name) else { throw ExitCode(2) }
        let directory = URL(fileURLWithPath: dir).standardizedFileURL.path
        var options = AttackOptions(directory: directory, domid: domid, devid: devid)
        options.kind = kind
        options.seconds = seconds
        options.answerTimeout = timeout
        options.queues = queues
        options.ringPageOrder = ringPageOrder
        options.protocol = BlkifProtocol(xenstoreValue: `protocol`) ?? .native
        let log: (String) -> Void = { message in
            FileHandle.standardError.write(Data("xensim attack \(name): \(message)\n".utf8))
        }
        do {
            // The guest's own socket: every request carries domain N's permissions.
            let socket = "\(directory)/dom\(domid).sock"
            setenv("XENSTORED_PATH", socket, 1)
            let store: XenStore
            do {
                store = try XenStore()
            } catch {
                throw FrontendFailure("cannot connect to domain \(domid)'s xenstore socket \(socket): \(error); is `xensim run --dir \(dir)` running and the domain created?")
            }
            try attack.run(options: options, store: store, log: log)
        } catch let failure as AttackFailure {
            log("FAILED: \(failure)")
            throw ExitCode.failure
        } catch {
            log("could not carry out the attack: \(error)")
            throw ExitCode(2)
        }
        log("passed")
    }
}
