import NIOCore

/// The narrow interface of Sluice's JSON layer: validate, read a field, edit a value, write.
///
/// Documents stay as bytes between processes; a field is read by scanning, not by building a tree.
/// `JSONValue` exists for the few places that edit a document, and keeps numbers as literal text.
public enum JSON {
    /// Validates a whole document.
    public static func validate(_ bytes: UnsafeRawBufferPointer, maxDepth: Int = JSONScanner.defaultMaxDepth)
        throws(JSONError)
    {
        var scanner = JSONScanner(bytes, maxDepth: maxDepth)
        try scanner.validateDocument()
    }

    public static func validate(_ buffer: ByteBuffer, maxDepth: Int = JSONScanner.defaultMaxDepth) throws(JSONError) {
        let result: JSONError? = buffer.withUnsafeReadableBytes { raw -> JSONError? in
            do throws(JSONError) { try validate(raw, maxDepth: maxDepth); return nil } catch { return error }
        }
        if let result { throw result }
    }

    /// The members of a top-level object, each value validated (unless `trusted`: see
    /// `JSONScanner.trusted`) and given as a byte range.
    public static func members(
        _ bytes: UnsafeRawBufferPointer, maxDepth: Int = JSONScanner.defaultMaxDepth, trusted: Bool = false
    ) throws(JSONError) -> [(key: String, range: Range<Int>)]
    {
        var scanner = JSONScanner(bytes, maxDepth: maxDepth, trusted: trusted)
        var out: [(key: String, range: Range<Int>)] = []
        do {
            try scanner.forEachMember { key, range in out.append((key, range)) }
            try scanner.expectEnd()
        } catch let e as JSONError { throw e } catch { fatalError("unreachable") }
        return out
    }

    /// The elements of a top-level array, each validated (unless `trusted`) and given as a byte range.
    public static func elements(
        _ bytes: UnsafeRawBufferPointer, maxDepth: Int = JSONScanner.defaultMaxDepth, trusted: Bool = false
    ) throws(JSONError) -> [Range<Int>]
    {
        var scanner = JSONScanner(bytes, maxDepth: maxDepth, trusted: trusted)
        var out: [Range<Int>] = []
        do {
            try scanner.forEachElement { out.append($0) }
            try scanner.expectEnd()
        } catch let e as JSONError { throw e } catch { fatalError("unreachable") }
        return out
    }

    /// The kind of an already validated value.
    public static func kind(_ bytes: UnsafeRawBufferPointer) -> JSONKind {
        switch bytes.first {
        case UInt8(ascii: "{"): return .object
        case UInt8(ascii: "["): return .array
        case UInt8(ascii: "\""): return .string
        case UInt8(ascii: "t"), UInt8(ascii: "f"): return .bool
        case UInt8(ascii: "n"): return .null
        default: return .number
        }
    }

    /// Decodes an already validated string value (with its quotes).
    public static func string(_ bytes: UnsafeRawBufferPointer) -> String? {
        guard kind(bytes) == .string else { return nil }
        var scanner = JSONScanner(bytes)
        return try? scanner.readString()
    }

    /// A signed 64-bit integer given as a JSON number or as a string of decimal digits, returned as
    /// canonical decimal text. Never goes through Double. Nil for anything else (fractions,
    /// exponents, out-of-range values, other types).
    public static func int64Text(_ bytes: UnsafeRawBufferPointer) -> String? {
        let text: String
        switch kind(bytes) {
        case .number: text = String(decoding: bytes, as: UTF8.self)
        case .string:
            guard let s = string(bytes) else { return nil }
            text = s
        default: return nil
        }
        guard let value = Int64(text) else { return nil }
        return String(value)
    }

    /// Whether `int64Text` would return a value, without building any String: a JSON number or a
    /// string holding an optional sign and decimal digits, within the signed 64-bit range.
    public static func isInt64(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var digits: UnsafeRawBufferPointer
        switch kind(bytes) {
        case .number:
            digits = bytes
        case .string:
            digits = UnsafeRawBufferPointer(rebasing: bytes[1..<(bytes.count - 1)])
            if digits.contains(UInt8(ascii: "\\")) { return int64Text(bytes) != nil }  // escaped: the slow way
        default:
            return false
        }
        var negative = false
        if let sign = digits.first, sign == UInt8(ascii: "-") || sign == UInt8(ascii: "+") {
            negative = sign == UInt8(ascii: "-")
            digits = UnsafeRawBufferPointer(rebasing: digits[1...])
        }
        guard !digits.isEmpty else { return false }
        var magnitude: UInt64 = 0
        for d in digits {
            guard d >= UInt8(ascii: "0") && d <= UInt8(ascii: "9") else { return false }
            let (times10, o1) = magnitude.multipliedReportingOverflow(by: 10)
            let (sum, o2) = times10.addingReportingOverflow(UInt64(d - UInt8(ascii: "0")))
            if o1 || o2 { return false }
            magnitude = sum
        }
        return magnitude <= (negative ? UInt64(Int64.max) + 1 : UInt64(Int64.max))
    }

    /// Writes `string` as a JSON string literal (quotes included).
    public static func writeString(_ string: String, into out: inout ByteBuffer) {
        withUTF8(string) { bytes in
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: maxStringBytes(bytes.count)) { $0.putString(bytes, at: 0) }
        }
    }

    /// The most bytes a JSON string literal of `count` UTF-8 bytes can take (every byte a
    /// `\u00XX`, and the quotes).
    @inlinable
    public static func maxStringBytes(_ count: Int) -> Int { count * 6 + 2 }

    /// Runs `body` over a string's UTF-8 bytes.
    @inlinable
    public static func withUTF8<T>(_ string: String, _ body: (UnsafeRawBufferPointer) -> T) -> T {
        if let result = string.utf8.withContiguousStorageIfAvailable({ body(UnsafeRawBufferPointer($0)) }) { return result }
        return Array(string.utf8).withUnsafeBytes(body)
    }
}

extension ByteBuffer {
    /// Runs `body` over the readable bytes of the buffer.
    @inlinable
    public func withBytes<T>(_ body: (UnsafeRawBufferPointer) throws -> T) rethrows -> T {
        try withUnsafeReadableBytes(body)
    }

    /// A slice of the readable bytes given as a range relative to `readerIndex`.
    public func slice(_ range: Range<Int>) -> ByteBuffer {
        getSlice(at: readerIndex + range.lowerBound, length: range.count)!
    }
}

extension ByteBuffer {
    /// Writes `bytes` between quotes, as they are (they need no escaping), with one capacity
    /// check: each of ByteBuffer's writes checks capacity and ownership, and these are per key,
    /// header and message id on the hot path.
    public mutating func writeQuoted(_ bytes: UnsafeRawBufferPointer) {
        writeWithUnsafeMutableBytes(minimumWritableBytes: bytes.count + 2) { $0.putQuoted(bytes, at: 0) }
    }

    /// Writes an integer's decimal digits (no `String` made for it).
    public mutating func writeDecimal<T: BinaryInteger>(_ value: T) {
        writeWithUnsafeMutableBytes(minimumWritableBytes: 40) { out in out.putDecimal(value, at: 0) }
    }
}

extension UnsafeMutableRawBufferPointer {
    /// Puts `value`'s decimal digits at `offset` (a minus sign first when negative; room for 40
    /// bytes is enough for any 128-bit integer); returns how many bytes it put.
    @inlinable
    public func putDecimal<T: BinaryInteger>(_ value: T, at offset: Int) -> Int {
        var i = offset
        if value < 0 {
            self[i] = UInt8(ascii: "-")
            i += 1
        }
        var n = value.magnitude
        let start = i
        repeat {
            let (q, r) = n.quotientAndRemainder(dividingBy: 10)
            self[i] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: r)
            i += 1
            n = q
        } while n != 0
        // The digits went in lowest first.
        var (lo, hi) = (start, i - 1)
        while lo < hi {
            swapAt(lo, hi)
            lo += 1
            hi -= 1
        }
        return i - offset
    }

    /// Puts `bytes` (UTF-8) at `offset` as a JSON string literal, escaped where JSON needs it;
    /// returns the bytes put (at most `JSON.maxStringBytes(bytes.count)`).
    @inlinable
    public func putString(_ bytes: UnsafeRawBufferPointer, at offset: Int) -> Int {
        if JSON.isPlain(bytes) { return putQuoted(bytes, at: offset) }
        let hex: StaticString = "0123456789abcdef"
        var i = offset
        func put(_ a: UInt8, _ b: UInt8) {
            self[i] = a
            self[i + 1] = b
            i += 2
        }
        self[i] = UInt8(ascii: "\"")
        i += 1
        for b in bytes {
            switch b {
            case UInt8(ascii: "\""): put(UInt8(ascii: "\\"), b)
            case UInt8(ascii: "\\"): put(b, b)
            case 0x0A: put(UInt8(ascii: "\\"), UInt8(ascii: "n"))
            case 0x0D: put(UInt8(ascii: "\\"), UInt8(ascii: "r"))
            case 0x09: put(UInt8(ascii: "\\"), UInt8(ascii: "t"))
            case 0..<0x20:
                put(UInt8(ascii: "\\"), UInt8(ascii: "u"))
                put(UInt8(ascii: "0"), UInt8(ascii: "0"))
                put(hex.utf8Start[Int(b >> 4)], hex.utf8Start[Int(b & 0xF)])
            default:
                self[i] = b
                i += 1
            }
        }
        self[i] = UInt8(ascii: "\"")
        return i + 1 - offset
    }

    /// Puts `bytes` between quotes at `offset` (they need no escaping); returns the bytes put.
    @inlinable
    public func putQuoted(_ bytes: UnsafeRawBufferPointer, at offset: Int) -> Int {
        self[offset] = UInt8(ascii: "\"")
        UnsafeMutableRawBufferPointer(rebasing: self[(offset + 1)...]).copyMemory(from: bytes)
        self[offset + bytes.count + 1] = UInt8(ascii: "\"")
        return bytes.count + 2
    }
}

extension JSON {
    /// Whether these UTF-8 bytes can go between quotes as they are (no quote, backslash or control
    /// character to escape).
    @inlinable
    public static func isPlain(_ bytes: UnsafeRawBufferPointer) -> Bool {
        !bytes.contains { $0 < 0x20 || $0 == UInt8(ascii: "\"") || $0 == UInt8(ascii: "\\") }
    }
}
