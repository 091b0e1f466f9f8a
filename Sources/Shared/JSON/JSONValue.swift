import NIOCore

/// A JSON value for the places that edit a document. Objects keep their member order and numbers
/// keep their literal text, so parse → write reproduces ids exactly.
public indirect enum JSONValue: Equatable, Sendable, CustomStringConvertible {
    case null
    case bool(Bool)
    /// The number's literal text, exactly as it appeared (or as written by the caller).
    case number(String)
    case string(String)
    case array([JSONValue])
    case object([Member])

    public struct Member: Equatable, Sendable {
        public var key: String
        public var value: JSONValue
        public init(_ key: String, _ value: JSONValue) {
            self.key = key
            self.value = value
        }
    }

    // MARK: Parsing

    public static func parse(_ bytes: UnsafeRawBufferPointer, maxDepth: Int = JSONScanner.defaultMaxDepth)
        throws(JSONError) -> JSONValue
    {
        var scanner = JSONScanner(bytes, maxDepth: maxDepth)
        do {
            scanner.skipWhitespace()
            let value = try read(&scanner, depth: 0)
            try scanner.expectEnd()
            return value
        } catch let error as JSONError {
            throw error
        } catch {
            throw JSONError(offset: scanner.position, message: "\(error)")
        }
    }

    public static func parse(_ buffer: ByteBuffer, maxDepth: Int = JSONScanner.defaultMaxDepth) throws(JSONError)
        -> JSONValue
    {
        let result: Result<JSONValue, JSONError> = buffer.withUnsafeReadableBytes { raw in
            do throws(JSONError) { return .success(try parse(raw, maxDepth: maxDepth)) } catch { return .failure(error) }
        }
        return try result.get()
    }

    public static func parse(_ text: String) throws(JSONError) -> JSONValue {
        try parse(ByteBuffer(string: text))
    }

    /// Builds the value at the scanner's position, validating it as it goes: one pass (each level
    /// used to validate its part of the document again; a large batch took three times as long).
    private static func read(_ s: inout JSONScanner, depth: Int) throws -> JSONValue {
        switch s.peek() {
        case UInt8(ascii: "{"):
            var members: [Member] = []
            try s.readObject(depth: depth) { s, key in members.append(Member(key.string, try read(&s, depth: depth + 1))) }
            return .object(members)
        case UInt8(ascii: "["):
            var items: [JSONValue] = []
            try s.readArray(depth: depth) { s, _ in items.append(try read(&s, depth: depth + 1)) }
            return .array(items)
        case UInt8(ascii: "\""):
            return .string(try s.readString())
        default:
            let start = s.position
            try s.skipValue(depth: depth)
            let text = s.bytes(start..<s.position)
            switch text.first {
            case UInt8(ascii: "t"): return .bool(true)
            case UInt8(ascii: "f"): return .bool(false)
            case UInt8(ascii: "n"): return .null
            default: return .number(String(decoding: text, as: UTF8.self))
            }
        }
    }

    // MARK: Reading and editing fields

    public subscript(key: String) -> JSONValue? {
        get {
            guard case .object(let members) = self else { return nil }
            return members.first(where: { $0.key == key })?.value
        }
        set {
            guard case .object(var members) = self else { return }
            if let i = members.firstIndex(where: { $0.key == key }) {
                if let newValue { members[i].value = newValue } else { members.removeAll { $0.key == key } }
            } else if let newValue {
                members.append(Member(key, newValue))
            }
            self = .object(members)
        }
    }

    public var stringValue: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    public var arrayValue: [JSONValue]? {
        if case .array(let a) = self { return a }
        return nil
    }

    /// An integer number (its literal text read as `Int`), else nil.
    public var intValue: Int? {
        if case .number(let n) = self { return Int(n) }
        return nil
    }

    // MARK: Writing

    public func write(into out: inout ByteBuffer) {
        switch self {
        case .null: out.writeStaticString("null")
        case .bool(let b):
            if b { out.writeStaticString("true") } else { out.writeStaticString("false") }
        case .number(let text): out.writeString(text)
        case .string(let s): JSON.writeString(s, into: &out)
        case .array(let items):
            out.writeInteger(UInt8(ascii: "["))
            for (i, item) in items.enumerated() {
                if i > 0 { out.writeInteger(UInt8(ascii: ",")) }
                item.write(into: &out)
            }
            out.writeInteger(UInt8(ascii: "]"))
        case .object(let members):
            out.writeInteger(UInt8(ascii: "{"))
            for (i, m) in members.enumerated() {
                if i > 0 { out.writeInteger(UInt8(ascii: ",")) }
                JSON.writeString(m.key, into: &out)
                out.writeInteger(UInt8(ascii: ":"))
                m.value.write(into: &out)
            }
            out.writeInteger(UInt8(ascii: "}"))
        }
    }

    public var jsonBytes: ByteBuffer {
        var out = ByteBuffer()
        write(into: &out)
        return out
    }

    public var jsonString: String { String(buffer: jsonBytes) }

    public var description: String { jsonString }
}
