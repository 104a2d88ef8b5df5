@testable import API
import Testing

@Suite struct JSONParsingTests {
    private func parse(_ text: String) throws(JSONError) -> JSONValue { try JSONValue.parse(Array(text.utf8)) }

    @Test func acceptsAnObjectAndKeepsMemberOrder() throws {
        let value = try parse(#"{"b": 1, "a": [true, null, 2.5, "x\u00e9"]}"#)
        #expect(value == .object([("b", .integer(1)), ("a", .array([.bool(true), .null, .number(2.5), .string("xé")]))]))
    }

    @Test(arguments: [
        #"{"state":"closing","state":"closed"}"#,   // duplicate keys
        #"{"state":"closing"} x"#,                  // trailing garbage
        #"{"state":"closing"}{}"#,                  // a second document
        #"{"state":"closing""#,                     // truncated
        "",                                          // empty
        "\"closing\"",                               // not an object or array
        #"{'state':'closing'}"#,                    // not JSON quoting
    ])
    func malformedDocumentIsRefused(text: String) {
        #expect(throws: JSONError.self) { try parse(text) }
    }

    @Test func invalidUTF8IsRefused() {
        let bytes: [UInt8] = Array(#"{"state":""#.utf8) + [0xC3, 0x28] + Array(#""}"#.utf8)
        #expect(throws: JSONError.self) { try JSONValue.parse(bytes) }
    }

    @Test func depthIsCapped() throws {
        let ok = String(repeating: "[", count: JSONValue.maximumDepth) + String(repeating: "]", count: JSONValue.maximumDepth)
        _ = try parse(ok)
        let deep = String(repeating: "[", count: JSONValue.maximumDepth + 1) + String(repeating: "]", count: JSONValue.maximumDepth + 1)
        #expect(throws: JSONError.self) { try parse(deep) }
        // Deeper than jansson's own limit (2048) is refused by jansson, without a crash.
        let huge = String(repeating: "[", count: 100_000)
        #expect(throws: JSONError.self) { try parse(huge) }
    }

    @Test func errorsAreOneLine() {
        do {
            _ = try parse(#"{"a":1,"a":2}"#)
            Issue.record("duplicate keys accepted")
        } catch {
            #expect(!error.description.contains("\n"))
            #expect(error.description.contains("duplicate"))
        }
    }
}

@Suite struct JSONSerializationTests {
    @Test func compactByDefaultIndentedWhenPretty() {
        let value = JSONValue.object([("z", .integer(1)), ("a", .array([.string("q\"\n"), .bool(false)]))])
        #expect(value.serialized() == #"{"z":1,"a":["q\"\n",false]}"#)
        #expect(value.serialized(pretty: true) == """
            {
              "z": 1,
              "a": [
                "q\\"\\n",
                false
              ]
            }
            """)
    }

    @Test func roundTrips() throws {
        let value = JSONValue.object([("n", .integer(Int64.max)), ("s", .string("ünïcode")), ("o", .object([])), ("x", .null)])
        #expect(try JSONValue.parse(Array(value.serialized().utf8)) == value)
    }
}

@Suite struct StateCommandTests {
    private func command(_ text: String) throws(JSONError) -> String {
        try ManagementAPI.stateCommand(try JSONValue.parse(Array(text.utf8))).rawValue
    }

    @Test func acceptsTheThreeCommands() throws {
        #expect(try command(#"{"state":"closing"}"#) == "closing")
        #expect(try command(#"{"state":"closed"}"#) == "closed")
        #expect(try command(#"{"state":"reconnect"}"#) == "reconnect")
    }

    @Test(arguments: [#"{}"#, #"{"state":1}"#, #"{"state":"open"}"#, #"{"state":"closing","force":true}"#,
                      #"["closing"]"#, #"{"state":null}"#, #"{"state":["closing"]}"#, #"{"State":"closing"}"#])
    func bodyOtherThanOneStateIsRefused(text: String) {
        #expect(throws: JSONError.self) { try command(text) }
    }
}
