import CJansson

/// A JSON document as Swift sees it. Objects keep their members' order, so output is stable.
public enum JSONValue: Equatable, Sendable {
    case null
    case bool(Bool)
    case integer(Int64)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([(String, JSONValue)])

    public static func == (lhs: JSONValue, rhs: JSONValue) -> Bool {
        switch (lhs, rhs) {
        case (.null, .null): true
        case (.bool(let a), .bool(let b)): a == b
        case (.integer(let a), .integer(let b)): a == b
        case (.number(let a), .number(let b)): a == b
        case (.string(let a), .string(let b)): a == b
        case (.array(let a), .array(let b)): a == b
        case (.object(let a), .object(let b)): a.count == b.count && zip(a, b).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: false
        }
    }

    /// The member named `key` of an object (nil for other values or a missing key).
    public subscript(key: String) -> JSONValue? {
        guard case .object(let members) = self else { return nil }
        return members.first { $0.0 == key }?.1
    }

    /// What a value is, for error messages ("expected a string, got an array").
    public var typeName: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .integer, .number: "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }
}

/// Why a request body is not acceptable JSON: one line for the client.
public struct JSONError: Error, Equatable, Sendable, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}

extension JSONValue {
    /// Deepest nesting accepted in a request body; our bodies are flat objects.
    public static let maximumDepth = 32

    /// Parses a request body strictly through jansson: one top-level object or array, no
    /// duplicate keys, nothing after the value, valid UTF-8, at most `maximumDepth` levels.
    public static func parse(_ bytes: [UInt8]) throws(JSONError) -> JSONValue {
        guard !bytes.isEmpty else { throw JSONError("empty body; expected a JSON object") }
        var error = json_error_t()
        // JSON_DISABLE_EOF_CHECK stays off: trailing garbage is an error.
        let flags = JSON_REJECT_DUPLICATES
        let root = bytes.withUnsafeBytes { buffer in
            json_loadb(buffer.baseAddress!.assumingMemoryBound(to: CChar.self), buffer.count, size_t(flags), &error)
        }
        guard let root else {
            let text = withUnsafeBytes(of: &error.text) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            throw JSONError("invalid JSON at line \(error.line), column \(error.column): \(text)")
        }
        defer { json_decref(root) }
        return try value(of: root, depth: 1)
    }

    private static func value(of node: UnsafeMutablePointer<json_t>, depth: Int) throws(JSONError) -> JSONValue {
        guard depth <= maximumDepth else { throw JSONError("JSON nested deeper than \(maximumDepth) levels") }
        switch node.pointee.type {
        case JSON_OBJECT:
            var members: [(String, JSONValue)] = []
            var iterator = json_object_iter(node)
            while let current = iterator {
                let key = String(decoding: UnsafeRawBufferPointer(start: json_object_iter_key(current),
                                                                  count: json_object_iter_key_len(current)),
                                 as: UTF8.self)
                members.append((key, try value(of: json_object_iter_value(current), depth: depth + 1)))
                iterator = json_object_iter_next(node, current)
            }
            return .object(members)
        case JSON_ARRAY:
            var elements: [JSONValue] = []
            for index in 0..<json_array_size(node) {
                elements.append(try value(of: json_array_get(node, index), depth: depth + 1))
            }
            return .array(elements)
        case JSON_STRING:
            return .string(String(decoding: UnsafeRawBufferPointer(start: json_string_value(node), count: json_string_length(node)),
                                  as: UTF8.self))
        case JSON_INTEGER: return .integer(json_integer_value(node))
        case JSON_REAL: return .number(json_real_value(node))
        case JSON_TRUE: return .bool(true)
        case JSON_FALSE: return .bool(false)
        default: return .null
        }
    }

    /// Serializes through jansson: compact on one line, or indented by two spaces.
    public func serialized(pretty: Bool = false) -> String {
        guard let node = jansson() else { return "null" }
        defer { json_decref(node) }
        // Members are emitted in insertion order (jansson ≥ 2.8 keeps it).
        let flags = (pretty ? 2 : JSON_COMPACT) | JSON_ENCODE_ANY | JSON_REAL_PRECISION(17)
        guard let text = json_dumps(node, size_t(flags)) else { return "null" }
        defer { free(text) }
        return String(cString: text)
    }

    /// A new jansson value (reference owned by the caller).
    private func jansson() -> UnsafeMutablePointer<json_t>? {
        switch self {
        case .null: return json_null()
        case .bool(let value): return value ? json_true() : json_false()
        case .integer(let value): return json_integer(value)
        case .number(let value): return value.isFinite ? json_real(value) : json_null()
        case .string(let value):
            return value.withCString { json_stringn($0, value.utf8.count) }
        case .array(let elements):
            let array = json_array()
            for element in elements { _ = json_array_append_new(array, element.jansson()) }
            return array
        case .object(let members):
            let object = json_object()
            for (key, value) in members {
                _ = key.withCString { json_object_setn_new(object, $0, key.utf8.count, value.jansson()) }
            }
            return object
        }
    }
}

// jansson's JSON_REAL_PRECISION is a function-like macro.
private func JSON_REAL_PRECISION(_ digits: Int32) -> Int32 { (digits & 0x1F) << 11 }
