#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A validating single-pass JSON scanner over raw UTF-8 bytes.
///
/// It checks the full JSON grammar (RFC 8259), UTF-8 inside strings and a nesting limit, and reports
/// where values start and end instead of building Swift objects. Numbers are never converted: callers
/// read their literal text, so 64-bit ids survive byte for byte.
public struct JSONError: Error, Equatable, CustomStringConvertible, Sendable {
    public var offset: Int
    public var message: String

    public init(offset: Int, message: String) {
        self.offset = offset
        self.message = message
    }

    public var description: String { "\(message) at byte \(offset)" }
}

/// The kind of a JSON value, from its first byte.
public enum JSONKind: Sendable, Equatable {
    case object, array, string, number, bool, null
}

public struct JSONScanner {
    public static let defaultMaxDepth = 64

    @usableFromInline let bytes: UnsafeRawBufferPointer
    @usableFromInline var index: Int
    @usableFromInline let maxDepth: Int
    /// The document was validated before: values are skipped by their structure alone (strings,
    /// brackets), several times faster, with no grammar or UTF-8 checks. Never for input that has
    /// not been through `validate`; on invalid input the ranges found are meaningless (but
    /// stay within the document).
    @usableFromInline let trusted: Bool

    public init(_ bytes: UnsafeRawBufferPointer, maxDepth: Int = JSONScanner.defaultMaxDepth, trusted: Bool = false) {
        self.bytes = bytes
        self.index = 0
        self.maxDepth = maxDepth
        self.trusted = trusted
    }

    public var position: Int { index }
    public var atEnd: Bool { index >= bytes.count }

    // MARK: Whole documents

    /// Validates a complete document: one value, surrounded only by whitespace.
    public mutating func validateDocument() throws(JSONError) {
        skipWhitespace()
        try skipValue(depth: 0)
        try expectEnd()
    }

    public mutating func expectEnd() throws(JSONError) {
        skipWhitespace()
        if index < bytes.count { throw error("unexpected data after the JSON value") }
    }

    // MARK: Shallow reading

    /// Reads a top-level object and calls `member` with each key and the byte range of its value.
    /// Every value is validated, none is built.
    public mutating func forEachMember(_ member: (_ key: String, _ value: Range<Int>) throws -> Void) throws {
        skipWhitespace()
        try readObject(depth: 0) { s, key in
            let start = s.index
            try s.skipValue(depth: 1)
            try member(key.string, start..<s.index)
        }
    }

    /// Reads a top-level array and calls `element` with the byte range of each element.
    public mutating func forEachElement(_ element: (_ value: Range<Int>) throws -> Void) throws {
        skipWhitespace()
        try readArray(depth: 0) { s, _ in
            let start = s.index
            try s.skipValue(depth: 1)
            try element(start..<s.index)
        }
    }

    // MARK: Reading nested documents in one pass

    /// Reads the object at the current position: for each member, `member` gets the scanner
    /// positioned at the value and the key, and must consume exactly one value (`skipValue`, or a
    /// nested `readObject`/`readArray` one level deeper than `depth`). Everything is validated
    /// once, as it is read.
    public mutating func readObject(depth: Int, _ member: (inout JSONScanner, JSONKey) throws -> Void) throws {
        guard peek() == UInt8(ascii: "{") else { throw error("expected a JSON object") }
        guard depth < maxDepth else { throw error("nesting deeper than \(maxDepth) levels") }
        index += 1
        skipWhitespace()
        if peek() == UInt8(ascii: "}") { index += 1; return }
        while true {
            skipWhitespace()
            guard peek() == UInt8(ascii: "\"") else { throw error("expected a string key") }
            let start = index
            let escaped = try skipString()
            let key = JSONKey(raw: UnsafeRawBufferPointer(rebasing: bytes[(start + 1)..<(index - 1)]), escaped: escaped)
            skipWhitespace()
            guard peek() == UInt8(ascii: ":") else { throw error("expected ':' after key") }
            index += 1
            skipWhitespace()
            try member(&self, key)
            skipWhitespace()
            switch peek() {
            case UInt8(ascii: ","): index += 1
            case UInt8(ascii: "}"): index += 1; return
            case nil: throw error("unexpected end of input in object")
            default: throw error("expected ',' or '}' in object")
            }
        }
    }

    /// Reads the array at the current position: `element` gets the scanner positioned at each
    /// element and its index, and must consume exactly one value. Returns the number of elements.
    @discardableResult
    public mutating func readArray(depth: Int, _ element: (inout JSONScanner, Int) throws -> Void) throws -> Int {
        guard peek() == UInt8(ascii: "[") else { throw error("expected a JSON array") }
        guard depth < maxDepth else { throw error("nesting deeper than \(maxDepth) levels") }
        index += 1
        skipWhitespace()
        if peek() == UInt8(ascii: "]") { index += 1; return 0 }
        var count = 0
        while true {
            skipWhitespace()
            try element(&self, count)
            count += 1
            skipWhitespace()
            switch peek() {
            case UInt8(ascii: ","): index += 1
            case UInt8(ascii: "]"): index += 1; return count
            case nil: throw error("unexpected end of input in array")
            default: throw error("expected ',' or ']' in array")
            }
        }
    }

    /// The bytes of the document in `range` (e.g. a value just skipped).
    public func bytes(_ range: Range<Int>) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: bytes[range])
    }

    // MARK: Values

    @inline(__always) public func peek() -> UInt8? {
        index < bytes.count ? bytes[index] : nil
    }

    @inline(__always) public mutating func skipWhitespace() {
        while index < bytes.count {
            switch bytes[index] {
            case 0x20, 0x0A, 0x0D, 0x09: index += 1
            default: return
            }
        }
    }

    func error(_ message: String) -> JSONError {
        JSONError(offset: index, message: message)
    }

    public mutating func skipValue(depth: Int) throws(JSONError) {
        guard let byte = peek() else { throw error("unexpected end of input") }
        if trusted { return skipValidated() }
        switch byte {
        case UInt8(ascii: "{"):
            guard depth < maxDepth else { throw error("nesting deeper than \(maxDepth) levels") }
            index += 1
            skipWhitespace()
            if peek() == UInt8(ascii: "}") { index += 1; return }
            while true {
                skipWhitespace()
                guard peek() == UInt8(ascii: "\"") else { throw error("expected a string key") }
                _ = try skipString()
                skipWhitespace()
                guard peek() == UInt8(ascii: ":") else { throw error("expected ':' after key") }
                index += 1
                skipWhitespace()
                try skipValue(depth: depth + 1)
                skipWhitespace()
                switch peek() {
                case UInt8(ascii: ","): index += 1
                case UInt8(ascii: "}"): index += 1; return
                case nil: throw error("unexpected end of input in object")
                default: throw error("expected ',' or '}' in object")
                }
            }
        case UInt8(ascii: "["):
            guard depth < maxDepth else { throw error("nesting deeper than \(maxDepth) levels") }
            index += 1
            skipWhitespace()
            if peek() == UInt8(ascii: "]") { index += 1; return }
            while true {
                skipWhitespace()
                try skipValue(depth: depth + 1)
                skipWhitespace()
                switch peek() {
                case UInt8(ascii: ","): index += 1
                case UInt8(ascii: "]"): index += 1; return
                case nil: throw error("unexpected end of input in array")
                default: throw error("expected ',' or ']' in array")
                }
            }
        case UInt8(ascii: "\""):
            _ = try skipString()
        case UInt8(ascii: "t"): try literal("true")
        case UInt8(ascii: "f"): try literal("false")
        case UInt8(ascii: "n"): try literal("null")
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            try skipNumber()
        default:
            throw error("unexpected character '\(printable(byte))'")
        }
    }

    /// Skips the value at the current position by its structure alone (see `trusted`): for values
    /// that were validated before. Stays within the document whatever the bytes.
    public mutating func skipStructure() {
        guard index < bytes.count else { return }
        skipValidated()
    }

    /// Steps over `count` bytes when they are in the document and the last one is one of
    /// `endingWith`; otherwise stays put and returns false.
    public mutating func skip(bytes count: Int, endingWith: [UInt8]) -> Bool {
        guard count > 0, count <= bytes.count - index, endingWith.contains(bytes[index + count - 1]) else { return false }
        index += count
        return true
    }

    /// Skips a value of a validated document by its structure.
    mutating func skipValidated() {
        switch bytes[index] {
        case UInt8(ascii: "\""):
            skipValidatedString()
        case UInt8(ascii: "{"), UInt8(ascii: "["):
            var depth = 0
            while index < bytes.count {
                switch bytes[index] {
                case UInt8(ascii: "\""):
                    skipValidatedString()
                    continue
                case UInt8(ascii: "{"), UInt8(ascii: "["):
                    depth += 1
                case UInt8(ascii: "}"), UInt8(ascii: "]"):
                    depth -= 1
                    if depth == 0 {
                        index += 1
                        return
                    }
                default:
                    break
                }
                index += 1
            }
        default:  // a number or a literal
            while index < bytes.count {
                switch bytes[index] {
                case UInt8(ascii: ","), UInt8(ascii: "]"), UInt8(ascii: "}"), 0x20, 0x0A, 0x0D, 0x09: return
                default: index += 1
                }
            }
        }
    }

    /// Skips a string of a validated document: finds its closing quote, eight bytes at a time.
    mutating func skipValidatedString() {
        index += 1
        while index < bytes.count {
            skipWords(JSONScanner.quotesOrBackslashes)
            guard index < bytes.count else { return }
            switch bytes[index] {
            case UInt8(ascii: "\""):
                index += 1
                return
            case UInt8(ascii: "\\"):
                index += 2
            default:
                index += 1
            }
        }
    }

    mutating func literal(_ word: StaticString) throws(JSONError) {
        let count = word.utf8CodeUnitCount
        guard index + count <= bytes.count else { throw error("invalid literal") }
        let w = word.utf8Start
        for k in 0..<count where bytes[index + k] != w[k] {
            throw error("invalid literal")
        }
        index += count
    }

    mutating func skipNumber() throws(JSONError) {
        if peek() == UInt8(ascii: "-") { index += 1 }
        guard let first = peek(), isDigit(first) else { throw error("invalid number") }
        index += 1
        if first != UInt8(ascii: "0") { skipDigits() }
        if peek() == UInt8(ascii: ".") {
            index += 1
            guard let d = peek(), isDigit(d) else { throw error("invalid number: digit expected after '.'") }
            skipDigits()
        }
        if let e = peek(), e == UInt8(ascii: "e") || e == UInt8(ascii: "E") {
            index += 1
            if let s = peek(), s == UInt8(ascii: "+") || s == UInt8(ascii: "-") { index += 1 }
            guard let d = peek(), isDigit(d) else { throw error("invalid number: digit expected in exponent") }
            while let d = peek(), isDigit(d) { index += 1 }
        }
        if let next = peek(), isDigit(next) { throw error("invalid number: leading zero") }
    }

    /// Skips ASCII digits, eight at a time while they last (ids and timestamps are long).
    @inline(__always) mutating func skipDigits() {
        if skipWords(JSONScanner.nonDigits) { return }
        while index < bytes.count, bytes[index] &- UInt8(ascii: "0") < 10 { index &+= 1 }
    }

    /// Moves eight bytes at a time while `marks` flags none of a word's bytes, then to the first
    /// flagged one (true); false when fewer than eight bytes are left unflagged. `marks` sets the
    /// high bit of (at least) the lowest byte it flags; bytes above a real match may be flagged by
    /// mistake (borrows and carries), which is why only the lowest counts.
    @inline(__always) @discardableResult
    mutating func skipWords(_ marks: (UInt64) -> UInt64) -> Bool {
        while index &+ 8 <= bytes.count {
            let flagged = marks(bytes.loadUnaligned(fromByteOffset: index, as: UInt64.self))
            if flagged != 0 {
                index &+= flagged.trailingZeroBitCount &>> 3
                return true
            }
            index &+= 8
        }
        return false
    }

    static let ones: UInt64 = 0x0101_0101_0101_0101
    static let highs: UInt64 = 0x8080_8080_8080_8080

    /// Bytes that are not '0'...'9': below '0' borrows, above '9' carries into the high bit,
    /// non-ASCII has its own.
    @inline(__always) static func nonDigits(_ word: UInt64) -> UInt64 {
        ((word &- ones &* 0x30) | (word &+ ones &* 0x46) | word) & highs
    }

    /// Quotes and backslashes (a validated string ends at the first unescaped quote).
    @inline(__always) static func quotesOrBackslashes(_ word: UInt64) -> UInt64 {
        let quote = word ^ (ones &* 0x22)
        let backslash = word ^ (ones &* 0x5C)
        return ((quote &- ones) & ~quote | (backslash &- ones) & ~backslash) & highs
    }

    /// Skips a string, validating escapes and UTF-8. Returns true if the string contained escapes.
    @discardableResult
    mutating func skipString() throws(JSONError) -> Bool {
        index += 1  // opening quote
        var escaped = false
        while index < bytes.count {
            // To the first byte that needs a look: a quote, backslash, control character or non-ASCII.
            skipWords(JSONScanner.specialBytes)
            guard index < bytes.count else { break }
            let b = bytes[index]
            if b == UInt8(ascii: "\"") { index += 1; return escaped }
            if b == UInt8(ascii: "\\") {
                escaped = true
                index += 1
                guard let e = peek() else { break }
                switch e {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"), UInt8(ascii: "b"),
                    UInt8(ascii: "f"), UInt8(ascii: "n"), UInt8(ascii: "r"), UInt8(ascii: "t"):
                    index += 1
                case UInt8(ascii: "u"):
                    index += 1
                    let unit = try hex4()
                    if unit >= 0xD800 && unit < 0xDC00 {
                        // A high surrogate must be followed by an escaped low surrogate.
                        guard index + 1 < bytes.count, bytes[index] == UInt8(ascii: "\\"),
                            bytes[index + 1] == UInt8(ascii: "u")
                        else { throw error("unpaired UTF-16 surrogate in \\u escape") }
                        index += 2
                        let low = try hex4()
                        guard low >= 0xDC00 && low < 0xE000 else {
                            throw error("unpaired UTF-16 surrogate in \\u escape")
                        }
                    } else if unit >= 0xDC00 && unit < 0xE000 {
                        throw error("unpaired UTF-16 surrogate in \\u escape")
                    }
                default:
                    throw error("invalid escape '\\\(printable(e))' in string")
                }
            } else if b < 0x20 {
                throw error("unescaped control character in string")
            } else if b < 0x80 {
                index += 1
            } else {
                try skipUTF8Sequence()
            }
        }
        throw error("unterminated string")
    }

    /// A mask with the high bit set in (at least) the lowest byte of `word` (little-endian) that is
    /// a quote, a backslash, below 0x20 or above 0x7F; zero when there is none. The borrow of the
    /// subtractions can only mark bytes above a real match, so the lowest marked byte is exact.
    @inline(__always) static func specialBytes(_ word: UInt64) -> UInt64 {
        let quote = word ^ (ones &* 0x22)
        let backslash = word ^ (ones &* 0x5C)
        let isQuote = (quote &- ones) & ~quote
        let isBackslash = (backslash &- ones) & ~backslash
        let isControl = (word &- ones &* 0x20) & ~word
        return (isQuote | isBackslash | isControl | word) & highs
    }

    mutating func hex4() throws(JSONError) -> UInt16 {
        guard index + 4 <= bytes.count else { throw error("invalid \\u escape") }
        var value: UInt16 = 0
        for _ in 0..<4 {
            let c = bytes[index]
            let v: UInt8
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): v = c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): v = c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): v = c - UInt8(ascii: "A") + 10
            default: throw error("invalid \\u escape")
            }
            value = value << 4 | UInt16(v)
            index += 1
        }
        return value
    }

    /// Validates one multi-byte UTF-8 sequence (no overlongs, no surrogates, ≤ U+10FFFF).
    mutating func skipUTF8Sequence() throws(JSONError) {
        let b0 = bytes[index]
        let count: Int
        var lower: UInt8 = 0x80
        var upper: UInt8 = 0xBF
        switch b0 {
        case 0xC2...0xDF: count = 2
        case 0xE0: count = 3; lower = 0xA0
        case 0xE1...0xEC, 0xEE...0xEF: count = 3
        case 0xED: count = 3; upper = 0x9F
        case 0xF0: count = 4; lower = 0x90
        case 0xF1...0xF3: count = 4
        case 0xF4: count = 4; upper = 0x8F
        default: throw error("invalid UTF-8")
        }
        guard index + count <= bytes.count else { throw error("invalid UTF-8") }
        let b1 = bytes[index + 1]
        guard b1 >= lower && b1 <= upper else { throw error("invalid UTF-8") }
        for k in 2..<max(2, count) {
            let b = bytes[index + k]
            guard b >= 0x80 && b <= 0xBF else { throw error("invalid UTF-8") }
        }
        index += count
    }

    // MARK: Reading scalars

    /// Reads a string value at the current position and decodes its escapes.
    public mutating func readString() throws(JSONError) -> String {
        let start = index
        let escaped = try skipString()
        let body = UnsafeRawBufferPointer(rebasing: bytes[(start + 1)..<(index - 1)])
        if !escaped { return String(decoding: body, as: UTF8.self) }
        return JSONScanner.unescape(body)
    }

    /// Decodes the escapes of an already validated string body (without quotes).
    static func unescape(_ body: UnsafeRawBufferPointer) -> String {
        var out = [UInt8]()
        out.reserveCapacity(body.count)
        var i = 0
        func hex(_ at: Int) -> UInt32 {
            var v: UInt32 = 0
            for k in 0..<4 {
                let c = body[at + k]
                let d: UInt32
                switch c {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): d = UInt32(c - UInt8(ascii: "0"))
                case UInt8(ascii: "a")...UInt8(ascii: "f"): d = UInt32(c - UInt8(ascii: "a") + 10)
                default: d = UInt32(c - UInt8(ascii: "A") + 10)
                }
                v = v << 4 | d
            }
            return v
        }
        while i < body.count {
            let b = body[i]
            guard b == UInt8(ascii: "\\") else { out.append(b); i += 1; continue }
            let e = body[i + 1]
            i += 2
            switch e {
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "u"):
                var scalar = hex(i)
                i += 4
                if scalar >= 0xD800 && scalar < 0xDC00 {
                    let low = hex(i + 2)
                    i += 6
                    scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                }
                out.append(contentsOf: Array(String(Character(Unicode.Scalar(scalar)!)).utf8))
            default: out.append(e)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    func isDigit(_ b: UInt8) -> Bool { b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9") }

    func printable(_ b: UInt8) -> String {
        b >= 0x20 && b < 0x7F ? String(UnicodeScalar(b)) : "\\x" + String(b, radix: 16)
    }
}

/// An object member's key as written between its quotes (escapes not yet decoded).
public struct JSONKey {
    public let raw: UnsafeRawBufferPointer
    public let escaped: Bool

    /// The decoded key.
    public var string: String { escaped ? JSONScanner.unescape(raw) : String(decoding: raw, as: UTF8.self) }

    /// Whether the decoded key is `name`, without building a String in the common case.
    @inline(__always) public func `is`(_ name: StaticString) -> Bool {
        if escaped { return string == name.description }
        guard raw.count == name.utf8CodeUnitCount else { return false }
        guard let base = raw.baseAddress else { return true }
        return memcmp(base, name.utf8Start, raw.count) == 0
    }
}
