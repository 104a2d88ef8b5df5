import Testing
@testable import XenSim

@Suite struct WireMessageTests {
    @Test func encodesLittleEndianHeaderThenPayload() {
        let message = WireMessage(.read, requestID: 0x01020304, transactionID: 7, strings: ["/a"])
        #expect(message.encoded() == [2, 0, 0, 0, 4, 3, 2, 1, 7, 0, 0, 0, 3, 0, 0, 0, 0x2f, 0x61, 0])
    }

    @Test func decodesByteByByteAndSeveralPerChunk() throws {
        let first = WireMessage(.write, requestID: 1, strings: ["/a", "value"])
        let second = WireMessage(.directory, requestID: 2, transactionID: 3, strings: ["/"])
        var decoder = WireDecoder()
        var decoded: [WireMessage] = []
        for byte in first.encoded() {
            #expect(decoded.isEmpty)
            decoder.append([byte])
            if let message = try decoder.next() { decoded.append(message) }
        }
        #expect(decoded == [first])
        decoder.append(second.encoded() + first.encoded())
        #expect(try decoder.next() == second)
        #expect(try decoder.next() == first)
        #expect(try decoder.next() == nil)
        #expect(decoder.pendingCount == 0)
    }

    @Test func rejectsPayloadAboveTheProtocolLimit() {
        var decoder = WireDecoder()
        decoder.append(WireMessage(rawType: 2, payload: []).encoded().prefix(12) + [0x01, 0x10, 0, 0])
        #expect(throws: WireDecoder.Failure.oversized(length: 4097)) { try decoder.next() }
    }

    @Test func acceptsThePayloadLimitAndKeepsUnknownTypes() throws {
        var decoder = WireDecoder()
        let message = WireMessage(rawType: 999, payload: [UInt8](repeating: 0x41, count: 4096))
        decoder.append(message.encoded())
        let decoded = try #require(try decoder.next())
        #expect(decoded.type == nil && decoded.rawType == 999 && decoded.payload.count == 4096)
    }

    @Test func splitsArgumentsLikeXenstored() {
        #expect(WireMessage(.read, payload: Array("/a\0".utf8)).singleArgument == Array("/a".utf8))
        #expect(WireMessage(.read, payload: Array("/a".utf8)).singleArgument == nil)
        #expect(WireMessage(.read, payload: Array("/a\0b\0".utf8)).singleArgument == nil)
        #expect(WireMessage(.read, payload: []).singleArgument == nil)
        #expect(WireMessage(.watch, payload: Array("/a\0tok\0trailing".utf8)).strings == [Array("/a".utf8), Array("tok".utf8)])
    }
}
