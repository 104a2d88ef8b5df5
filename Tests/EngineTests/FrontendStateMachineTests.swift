@testable import ControlPlane
import Engine
import Glibc
import Testing

@Suite struct FrontendStateMachineTests {
    static let backendStates = XenbusState.allCases

    @Test(arguments: backendStates)
    func initialisingReopensOnlyAClosedBackend(backend: XenbusState) {
        let actions = frontendChanged(backend: backend, frontend: .number(1), online: true)
        #expect(actions == (backend == .closed ? [.switchState(.initWait)] : []))
    }

    @Test(arguments: backendStates)
    func frontendInitWaitIsWaitedOut(backend: XenbusState) {
        #expect(frontendChanged(backend: backend, frontend: .number(2), online: true).isEmpty)
    }

    @Test(arguments: backendStates, [XenbusState.initialised, .connected])
    func readyFrontendConnectsUnlessConnected(backend: XenbusState, frontend: XenbusState) {
        let actions = frontendChanged(backend: backend, frontend: .number(frontend.rawValue), online: true)
        #expect(actions == (backend == .connected ? [] : [.disconnect, .connect]))
    }

    @Test(arguments: backendStates, [true, false])
    func closingFollowsTheFrontend(backend: XenbusState, online: Bool) {
        #expect(frontendChanged(backend: backend, frontend: .number(5), online: online) == [.switchState(.closing)])
    }

    @Test(arguments: backendStates)
    func closedStaysRegisteredWhileOnline(backend: XenbusState) {
        #expect(frontendChanged(backend: backend, frontend: .number(6), online: true) == [.disconnect, .switchState(.closed)])
        #expect(frontendChanged(backend: backend, frontend: .number(6), online: false)
                == [.disconnect, .switchState(.closed), .unregister])
    }

    @Test(arguments: backendStates)
    func unknownOrMissingUnregisters(backend: XenbusState) {
        #expect(frontendChanged(backend: backend, frontend: .number(0), online: true) == [.unregister])
        #expect(frontendChanged(backend: backend, frontend: FrontendStateReading(node: nil), online: true) == [.unregister])
    }

    @Test(arguments: [7, 8, 9, -1, 1000])
    func otherNumbersAreFatal(state: Int) {
        let actions = frontendChanged(backend: .initWait, frontend: .number(state), online: true)
        #expect(actions == [.fatal(errno: EINVAL, message: "saw state \(state) at frontend")])
    }

    @Test func garbageIsFatal() {
        let reading = FrontendStateReading(node: "connected")
        #expect(reading == .garbage("connected"))
        #expect(frontendChanged(backend: .initWait, frontend: reading, online: true)
                == [.fatal(errno: EINVAL, message: "saw state 'connected' at frontend")])
    }

    @Test func readingParsesNodeValues() {
        #expect(FrontendStateReading(node: "4") == .number(4))
        #expect(FrontendStateReading(node: " 3 ") == .number(3))
        #expect(FrontendStateReading(node: "") == .garbage(""))
        #expect(FrontendStateReading(node: "4").state == .connected)
        #expect(FrontendStateReading(node: "42").state == nil)
    }
}
