import Foundation
import Testing

/// Malicious guests against one blkback-server: every attack `xensim attack --list` names runs
/// on domain 1 while an honest domain 2 does verified I/O throughout on a disk of its own;
/// all of them on the native ring, on an x86_32 ring, and on 4 queues of order-2 rings.
@Suite(.serialized) struct AttackTests {
    static let readOnlyAttack = "write-barrier-or-discard-on-read-only"

    @Test func listNamesEveryAttackOnceALine() throws {
        let result = try Harness.run(Harness.executable("xensim"), ["attack", "--list"], timeout: 20)
        #expect(result.status == 0)
        let names = result.stdout.split(separator: "\n").map(String.init)
        #expect(Set(names).count == names.count, "duplicate names: \(names)")
        for required in ["read-into-readonly-grant", "bad-grant-ref", "zero-segments", "too-many-segments",
                         "bad-segment-sectors", "sector-out-of-range", "unknown-operation", Self.readOnlyAttack,
                         "ring-index-overflow", "indirect-abuse", "double-fetch", "state-flapping", "bad-ring-ref",
                         "bad-event-channel", "event-storm", "xenstore-flood"] {
            #expect(names.contains(required), "--list lacks \(required)")
        }
        #expect(names.allSatisfy { !$0.contains(" ") && !$0.isEmpty })
    }

    @Test func attacksWithoutADeviceCannotBeSetUp() throws {
        let sim = try Simulator("attack-setup")
        defer { sim.stop() }
        #expect(try sim.xensim(["domain", "create"], ["--domid", "1"]).status == 0)
        let result = try sim.xensim(["attack"], ["--domid", "1", "--devid", "51712", "--name", "zero-segments"])
        #expect(result.status == 2, "stderr: \(result.stderr)")
        #expect(result.stderr.contains("xensim attach"))
        let unknown = try sim.xensim(["attack"], ["--domid", "1", "--devid", "51712", "--name", "no-such-attack"])
        #expect(unknown.status != 0 && unknown.stderr.contains("--list"))
    }

    static let ringShapes: [[String]] = [[], ["--protocol", "x86_32-abi"], ["--queues", "4", "--ring-page-order", "2"]]
    /// Disks of the attacker's besides its two (many-vbds connects them all).
    static let moreAttackerDisks = 6

    @Test(arguments: ringShapes)
    func everyAttackIsRepelledWhileAnHonestGuestKeepsVerifying(shape: [String]) throws {
        let sim = try Simulator("attacks")
        defer { sim.stop() }
        let daemon = try BackgroundProcess(Harness.executable("blkback-server"),
                                           ["--sim", sim.path, "--log-level", "info", "--max-queues", "4"])
        var disks = ["attacker.img": 64 << 20, "attacker-ro.img": 16 << 20, "honest.img": 64 << 20]
        for index in 0..<Self.moreAttackerDisks { disks["attacker-\(index).img"] = 8 << 20 }
        for (name, size) in disks {
            let path = sim.directory.appendingPathComponent(name).path
            #expect(FileManager.default.createFile(atPath: path, contents: nil))
            #expect(truncate(path, off_t(size)) == 0)
        }
        func disk(_ name: String) -> String { sim.directory.appendingPathComponent(name).path }
        for domid in ["1", "2"] {
            let created = try sim.xensim(["domain", "create"], ["--domid", domid])
            #expect(created.status == 0, "domain create: \(created.stderr)")
        }
        let extra = (0..<Self.moreAttackerDisks).map { ("1", "\(51744 + 16 * $0)", "attacker-\($0).img", "w") }
        for (domid, devid, file, mode) in [("1", "51712", "attacker.img", "w"), ("1", "51728", "attacker-ro.img", "r"),
                                           ("2", "51712", "honest.img", "w")] + extra {
            let attach = try sim.xensim(["attach"], ["--domid", domid, "--devid", devid, "--target", disk(file), "--mode", mode])
            try #require(attach.status == 0, "attach \(domid)/\(devid): \(attach.stderr) daemon: \(daemon.output)")
        }

        let honest = try BackgroundProcess(Harness.executable("xensim"), [
            "frontend", "--dir", sim.path, "--domid", "2", "--devid", "51712", "--workload", "randrw", "--qd", "8",
            "--seconds", "3600", "--json"])
        defer { honest.stop(signal: SIGKILL, grace: 1) }
        let connected = try eventually {
            try sim.xenstore("xenstore-read", ["/local/domain/2/device/vbd/51712/state"]).stdout.hasPrefix("4")
        }
        try #require(connected, "the honest guest did not connect: \(honest.output)")

        let list = try Harness.run(Harness.executable("xensim"), ["attack", "--list"], timeout: 20)
        let attacks = list.stdout.split(separator: "\n").map(String.init)
        #expect(attacks.count >= 16)
        for attack in attacks {
            let devid = attack == Self.readOnlyAttack ? "51728" : "51712"
            let started = Date()
            let result = try sim.xensim(["attack"], ["--domid", "1", "--devid", devid, "--name", attack, "--seconds", "2", "--timeout", "60"] + shape,
                                        timeout: 120)
            #expect(result.status == 0, "\(attack) exited \(result.status): \(result.stderr)")
            #expect(daemon.isRunning, "blkback-server died during \(attack): \(daemon.output.suffix(4000))")
            #expect(honest.isRunning, "the honest guest stopped during \(attack): \(honest.output.suffix(2000))")
            let summary = result.stderr.split(separator: "\n").last.map { " — " + $0 } ?? ""
            print("attack \(attack) \(shape.joined(separator: " ")): exit \(result.status)\(summary) in \(String(format: "%.1f", Date().timeIntervalSince(started))) s")
        }

        // The honest guest stops on SIGINT like a guest shutting down, and reports.
        #expect(honest.stop(signal: SIGINT, grace: 30) == 0, "honest guest: \(honest.output.suffix(2000))")
        let json = honest.output.split(separator: "\n").first { $0.hasPrefix("{") }.map(String.init) ?? ""
        let report = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any],
                                  "no JSON report: \(honest.output.suffix(2000))")
        #expect(report["errors"] as? Int == 0, "honest guest errors: \(json)")
        #expect(report["verify_failures"] as? Int == 0, "honest guest verify failures: \(json)")
        #expect((report["ops"] as? Int ?? 0) > 100, "the honest guest was barely served: \(json)")

        // No write reached the read-only disk; nothing was written past the end of the other.
        let readOnly = try Data(contentsOf: URL(fileURLWithPath: disk("attacker-ro.img")))
        #expect(readOnly.count == 16 << 20 && readOnly.allSatisfy { $0 == 0 }, "the read-only disk changed")
        let attackerSize = try FileManager.default.attributesOfItem(atPath: disk("attacker.img"))[.size] as? Int
        #expect(attackerSize == 64 << 20, "the attacker's disk grew to \(attackerSize ?? -1) bytes")

        #expect(daemon.isRunning)
        #expect(daemon.stop() == 0, "blkback-server did not exit 0 on SIGTERM: \(daemon.output.suffix(4000))")
    }
}
