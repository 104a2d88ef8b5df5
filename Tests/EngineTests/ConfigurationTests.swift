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
        let vbd = VBDIdentity(kind: "vbd3", domid: DomainID(rawValue: 1)!, devid: 51712)
        for token in [WatchToken.backendTree(kind: "vbd"), .frontendState(vbd), .physicalDevice(vbd)] {
            #expect(WatchToken(token.text) == token)
        }
        #expect(WatchToken("nonsense") == nil)
        #expect(WatchToken("other:x") == nil)
        #expect(WatchToken("frontend-state:vbd/1") == nil)
        #expect(WatchToken("frontend-state:vbd/32752/51712") == nil)
    }
}
