@testable import API
import Testing

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
    func addressWithoutHostAndPortIsRefused(text: String) {
        #expect(throws: ListenAddressError.self) { try ListenAddress(text) }
    }
}
