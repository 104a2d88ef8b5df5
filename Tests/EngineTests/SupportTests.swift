import Testing
@testable import Engine

@Suite struct ListenAddressTests {
    @Test func loopbackAddresses() throws {
        #expect(try ListenAddress("127.0.0.1:8080").isLoopback)
        #expect(try ListenAddress("127.1.2.3:1").isLoopback)
        #expect(try ListenAddress("[::1]:8080").isLoopback)
        #expect(try ListenAddress("localhost:80").isLoopback)
        #expect(try ListenAddress("[::1]:8080").description == "[::1]:8080")
    }

    @Test func otherAddresses() throws {
        #expect(try !ListenAddress("0.0.0.0:8080").isLoopback)
        #expect(try !ListenAddress("[::]:8080").isLoopback)
        #expect(try !ListenAddress("192.168.1.2:80").isLoopback)
    }

    @Test(arguments: ["", "8080", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "host.example:80", "[::1]8080", "::1:80x"])
    func refused(text: String) {
        #expect(throws: ListenAddressError.self) { try ListenAddress(text) }
    }
}

@Suite struct ConfigurationTests {
    @Test func defaultsAreValid() {
        #expect(BackendConfiguration().validationError == nil)
        #expect(BackendConfiguration().backendRoot(kind: "vbd") == "/local/domain/0/backend/vbd")
    }

    @Test func limitsAreChecked() {
        #expect(BackendConfiguration(maxQueues: 0).validationError != nil)
        #expect(BackendConfiguration(maxRingPageOrder: 5).validationError != nil)
        #expect(BackendConfiguration(maxIndirectSegments: 4097).validationError != nil)
        #expect(BackendConfiguration(kinds: []).validationError != nil)
        #expect(BackendConfiguration(kinds: ["vbd", "../x"]).validationError != nil)
        #expect(BackendConfiguration(kinds: ["vbd3", "qdisk", "my_kind-2"]).validationError == nil)
    }

    @Test func watchTokensRoundTrip() {
        for token in [WatchToken.backendTree(kind: "vbd"), .frontendState(backendPath: "/local/domain/0/backend/vbd/1/51712"),
                      .physicalDevice(backendPath: "/a:b")] {
            #expect(WatchToken(token.text) == token)
        }
        #expect(WatchToken("nonsense") == nil)
        #expect(WatchToken("other:x") == nil)
    }
}
