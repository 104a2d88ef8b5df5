@testable import ControlPlane
import Engine
import Testing

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
