@testable import API
@testable import ControlPlane
import Engine
import Testing

@Suite struct BearerTokenTests {
    @Test func authorizesOnlyTheExactToken() throws {
        let token = try #require(BearerToken("s3cret\n"))
        #expect(token.authorizes("Bearer s3cret"))
        #expect(token.authorizes("bearer s3cret"))
        #expect(!token.authorizes(nil))
        #expect(!token.authorizes("Bearer s3cre"))
        #expect(!token.authorizes("Bearer s3cret2"))
        #expect(!token.authorizes("Bearer S3cret"))
        #expect(!token.authorizes("Basic s3cret"))
        #expect(!token.authorizes("Bearer "))
        #expect(!token.authorizes("s3cret"))
        #expect(BearerToken(" \n") == nil)
    }

    @Test func constantTimeEqualityCompares() {
        #expect(BearerToken.constantTimeEqual([1, 2, 3], [1, 2, 3]))
        #expect(!BearerToken.constantTimeEqual([1, 2, 3], [1, 2, 4]))
        #expect(!BearerToken.constantTimeEqual([1, 2], [1, 2, 0]))
        #expect(!BearerToken.constantTimeEqual([], [0]))
    }
}

@Suite struct NegotiationTests {
    private func pretty(_ query: [String: String] = [:], accept: String? = nil) -> Bool {
        ManagementAPI.wantsPretty(HTTPRequest(method: "GET", path: "/v1/vbds", query: query,
                                              headers: accept.map { ["accept": $0] } ?? [:]))
    }

    @Test func prettyOnRequest() {
        #expect(!pretty())
        #expect(pretty(["pretty": ""]))
        #expect(pretty(["pretty": "1"]))
        #expect(!pretty(["pretty": "0"]))
        #expect(!pretty(["pretty": "false"]))
        #expect(!pretty(accept: "*/*"))
        #expect(!pretty(accept: "application/json"))
        #expect(pretty(accept: "text/plain"))
        #expect(pretty(accept: "text/plain, application/json;q=0.5"))
        #expect(!pretty(accept: "text/plain;q=0.2, application/json"))
    }

    @Test func pathNumbersAreCanonicalDecimals() {
        #expect(XenbusValue.pathNumber("0") == 0)
        #expect(XenbusValue.pathNumber("51712") == 51712)
        #expect(XenbusValue.pathNumber("4294967295") == UInt32.max)
        for bad in ["", "-1", "+1", " 1", "1e3", "4294967296", "99999999999", "0x10", "١", "007"] {
            #expect(XenbusValue.pathNumber(bad) == nil, "\(bad)")
        }
        #expect(DomainID(pathElement: "32751") == DomainID.largest)
        #expect(DomainID(pathElement: "32752") == nil)
    }

    @Test func echoedTextIsOneBoundedLine() {
        #expect(ManagementAPI.printable("a\nb\u{0}c") == "a?b?c")
        #expect(ManagementAPI.printable(String(repeating: "x", count: 100)).count == 65)
    }
}

@Suite struct MetricsExpositionTests {
    private func snapshot(target: String = "/srv/disk.img", statistics: VBDStatistics? = nil) -> VBDSnapshot {
        VBDSnapshot(identity: VBDIdentity(kind: "vbd", domid: DomainID(rawValue: 3)!, devid: 51712), backendPath: "/local/domain/0/backend/vbd/3/51712",
                    frontendPath: "/local/domain/3/device/vbd/51712", backendState: .connected, frontendState: .connected,
                    mode: "w", target: target, sectors: 2048, sectorSize: 512, physicalSectorSize: 4096, info: [],
                    protocol: "x86_64-abi", queues: 2, ringPageOrder: 1, persistentGrants: false, maxIndirectSegments: 256,
                    features: BlockFeatures(flush: true), qos: .none, statistics: statistics, error: nil)
    }

    @Test func labelValuesAreEscaped() {
        #expect(MetricsExposition.escapeLabel(#"a\b"c"# + "\nd") == #"a\\b\"c\nd"#)
        let text = MetricsExposition.render([snapshot(target: "/srv/we\"ird\\na\nme")])
        #expect(text.contains(#"target="/srv/we\"ird\\na\nme""#))
    }

    @Test func countersAndHistogramFromStatistics() {
        var statistics = VBDStatistics()
        statistics.readRequests = 7
        statistics.writeSectors = 16
        statistics.inflight = 2
        statistics.latency[BlockOperationKind.read.rawValue].record(nanoseconds: 30_000)   // 30 µs
        statistics.latency[BlockOperationKind.read.rawValue].record(nanoseconds: 2_000_000_000)
        let text = MetricsExposition.render([snapshot(statistics: statistics)])
        let labels = #"domid="3",devid="51712",kind="vbd""#
        #expect(text.contains("blkback_reads_completed_total{\(labels)} 7\n"))
        #expect(text.contains("blkback_written_bytes_total{\(labels)} 8192\n"))
        #expect(text.contains("blkback_io_now{\(labels)} 2\n"))
        #expect(text.contains("blkback_vbd_state{\(labels)} 4\n"))
        #expect(text.contains(#"blkback_request_duration_seconds_bucket{\#(labels),op="read",le="2.5e-05"} 0"#))
        #expect(text.contains(#"blkback_request_duration_seconds_bucket{\#(labels),op="read",le="5e-05"} 1"#))
        #expect(text.contains(#"blkback_request_duration_seconds_bucket{\#(labels),op="read",le="2.5"} 2"#))
        #expect(text.contains(#"blkback_request_duration_seconds_bucket{\#(labels),op="read",le="+Inf"} 2"#))
        #expect(text.contains(#"blkback_request_duration_seconds_count{\#(labels),op="read"} 2"#))
        #expect(text.contains("# TYPE blkback_request_duration_seconds histogram\n"))
        // Every family is announced once, with HELP before TYPE.
        #expect(text.components(separatedBy: "# TYPE blkback_vbd_info gauge").count == 2)
    }

    @Test func aVBDThatIsGoneHasNoSeries() {
        let text = MetricsExposition.render([])
        #expect(!text.contains("domid="))
        #expect(text.contains("# TYPE blkback_reads_completed_total counter"))
    }
}
