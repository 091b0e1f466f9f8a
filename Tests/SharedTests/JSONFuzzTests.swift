import Foundation
import NIOCore
import XCTest

@testable import Shared

/// Random and adversarial documents: the scanner against Foundation's parser (acceptance and
/// decoded strings), and the one-pass batch validator against the multi-pass reference.
final class JSONFuzzTests: XCTestCase {
    /// Pieces of string bodies, valid and not, so that every kind of byte the 8-byte fast path must
    /// stop at lands at every offset within a word.
    static let pieces: [[UInt8]] = [
        Array("a".utf8), Array("hello".utf8), Array("0123456789abcdef".utf8), Array(" ".utf8),
        Array("\\\"".utf8), Array("\\\\".utf8), Array("\\n".utf8), Array("\\/".utf8), Array("\\u00e9".utf8),
        Array("\\ud83d\\ude00".utf8), Array("é".utf8), Array("日本".utf8), Array("😀".utf8), [0x7F],
        Array("\\u0001\\t\\r\\b\\f\\u001f".utf8),
        // invalid: raw control characters, bad escapes, broken or forbidden UTF-8, lone surrogates
        [0x09], [0x00], [0x1F], Array("\\x".utf8), Array("\\u12".utf8), Array("\\ud83d".utf8), [0xFF], [0xC0, 0x80],
        [0x80], [0xE2, 0x82], [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80], [0xC3],
    ]
    static let invalidFrom = 15

    func randomBody(_ rng: inout SeededRNG, invalidChance: Int) -> [UInt8] {
        var body: [UInt8] = []
        for _ in 0..<Int.random(in: 0..<24, using: &rng) {
            let valid = Int.random(in: 0..<100, using: &rng) >= invalidChance
            let range = valid ? 0..<Self.invalidFrom : Self.invalidFrom..<Self.pieces.count
            body += Self.pieces[Int.random(in: range, using: &rng)]
        }
        return body
    }

    func testStringsAgreeWithFoundation() {
        var rng = SeededRNG(state: 20_261_126)
        var accepted = 0
        for round in 0..<20_000 {
            let padding = [UInt8](repeating: UInt8(ascii: " "), count: round % 9)
            let body = randomBody(&rng, invalidChance: round % 3 == 0 ? 3 : 0)
            let doc: [UInt8] = Array("[".utf8) + padding + [UInt8(ascii: "\"")] + body + Array("\",1]".utf8)
            let ours = doc.withUnsafeBytes { raw in (try? JSON.validate(raw)) != nil }
            let theirs = try? JSONSerialization.jsonObject(with: Data(doc)) as? [Any]
            XCTAssertEqual(ours, theirs != nil, "round \(round): \(doc.map { String($0, radix: 16) })")
            guard ours, let theirs, let expected = theirs.first as? String else { continue }
            accepted += 1
            let decoded = doc.withUnsafeBytes { raw -> String? in
                let elements = try? JSON.elements(raw)
                return elements.flatMap { JSON.string(UnsafeRawBufferPointer(rebasing: raw[$0[0]])) }
            }
            XCTAssertEqual(decoded, expected, "round \(round)")
            // Written back (escaped where JSON needs it), it reads as the same string.
            var written = ByteBuffer()
            JSON.writeString(expected, into: &written)
            let back = try? JSONSerialization.jsonObject(with: Data(written.readableBytesView), options: .fragmentsAllowed) as? String
            XCTAssertEqual(back, expected, "round \(round): \(String(buffer: written))")
        }
        XCTAssertGreaterThan(accepted, 10_000)
    }

    /// Numbers of every length (the digit runs are skipped eight at a time), valid and not, in
    /// arrays and objects: accepted exactly when Foundation accepts them (within Double's range).
    func testNumbersAgreeWithFoundation() {
        var rng = SeededRNG(state: 42)
        let parts = ["-", "0", "1", "9", "5", ".", "e", "E", "+", "-", "x", " "]
        var accepted = 0
        for round in 0..<20_000 {
            var number = Bool.random(using: &rng) ? "-" : ""
            number += String((0..<Int.random(in: 0..<25, using: &rng)).map { _ in "0123456789".randomElement(using: &rng)! })
            for _ in 0..<Int.random(in: 0..<3, using: &rng) {
                let part = parts.randomElement(using: &rng)!
                number += part + String(repeating: "7", count: Int.random(in: 0..<12, using: &rng))
            }
            if let e = number.firstIndex(where: { $0 == "e" || $0 == "E" }), number[e...].filter(\.isNumber).count > 2 { continue }
            // (Exponents stay small: Foundation refuses values beyond Double's range, which Sluice,
            // keeping numbers as text, accepts as the grammar allows.)
            let doc = round % 2 == 0 ? "[\(number)]" : "{\"n\":\(number),\"m\":1}"
            let ours = (try? JSON.validate(ByteBuffer(string: doc))) != nil
            let theirs = (try? JSONSerialization.jsonObject(with: Data(doc.utf8))) != nil
            XCTAssertEqual(ours, theirs, doc)
            if ours { accepted += 1 }
        }
        XCTAssertGreaterThan(accepted, 4_000)
    }

    // MARK: The batch validator

    func randomBatch(_ rng: inout SeededRNG) -> String {
        func pick(_ options: [String]) -> String { options.randomElement(using: &rng)! }
        var members: [String] = []
        if Int.random(in: 0..<10, using: &rng) > 0 {
            members.append("\"environment\":" + pick(["\"production\"", "\"development\"", "\"unknown\"", "\"staging\"", "1", "null"]))
        }
        for key in ["mpid", "batch_id"] where Bool.random(using: &rng) {
            members.append(
                "\"\(key)\":"
                    + pick([
                        "-9223372036854775808", "9223372036854775807", "9223372036854775808", "\"42\"", "\"+7\"", "\"-\"",
                        "1.5", "1e3", "null", "\"4\\u0032\"", "true", "\"\"", "0",
                    ]))
        }
        for key in ["user_identities", "device_info", "user_attributes", "context", "other"] where Int.random(in: 0..<4, using: &rng) == 0 {
            members.append("\"\(key)\":" + pick(["{}", "[]", "\"x\"", "null", "{\"a\":[1,{\"b\":\"c\"}]}"]))
        }
        if Int.random(in: 0..<8, using: &rng) > 0 {
            var events: [String] = []
            for _ in 0..<Int.random(in: 0..<5, using: &rng) {
                var fields: [String] = []
                if Int.random(in: 0..<8, using: &rng) > 0 {
                    fields.append("\"event_type\":" + pick(["\"custom_event\"", "\"screen_view\"", "\"nope\"", "\"\"", "3", "\"session_start\""]))
                }
                if Int.random(in: 0..<8, using: &rng) > 0 {
                    var data: [String] = []
                    for key in ["event_id", "session_id", "source_message_id", "custom_attributes"] where Bool.random(using: &rng) {
                        data.append("\"\(key)\":" + pick(["1", "\"-5\"", "\"abc\"", "null", "2.5", "{\"k\":\"v\"}", "18446744073709551616"]))
                    }
                    fields.append("\"data\":" + (Int.random(in: 0..<10, using: &rng) == 0 ? "[]" : "{\(data.joined(separator: ","))}"))
                }
                if Bool.random(using: &rng) { fields.append("\"timestamp_unixtime_ms\":1700000000000") }
                fields.shuffle(using: &rng)
                events.append(Int.random(in: 0..<15, using: &rng) == 0 ? "1" : "{\(fields.joined(separator: ", "))}")
            }
            members.append("\"events\":" + (Int.random(in: 0..<15, using: &rng) == 0 ? "{}" : "[\(events.joined(separator: ","))]"))
        }
        members.shuffle(using: &rng)
        return "{\(members.joined(separator: ","))}"
    }

    /// A few random byte edits: removals, JSON punctuation, bad bytes, deep nesting.
    func mutate(_ doc: String, _ rng: inout SeededRNG) -> [UInt8] {
        var bytes = Array(doc.utf8)
        for _ in 0..<Int.random(in: 1...3, using: &rng) where !bytes.isEmpty {
            let at = Int.random(in: 0..<bytes.count, using: &rng)
            switch Int.random(in: 0..<4, using: &rng) {
            case 0: bytes.remove(at: at)
            case 1: bytes.insert(Array("{}[]:,\"\\ 0-e.".utf8).randomElement(using: &rng)!, at: at)
            case 2: bytes[at] = [0x00, 0xFF, 0xC3, 0x80, 0x0A].randomElement(using: &rng)!
            default: bytes.insert(contentsOf: Array(String(repeating: "[", count: 70).utf8), at: at)
            }
        }
        return bytes
    }

    func testOnePassValidatorAgreesWithReference() {
        var rng = SeededRNG(state: 7_202_611)
        let validator = BatchValidator(maxBatchBytes: 1 << 20)
        let reference = ReferenceBatchValidator()
        var outcomes: [String: Int] = [:]
        for round in 0..<20_000 {
            let batch = randomBatch(&rng)
            let bytes = round % 4 == 0 ? mutate(batch, &rng) : Array(batch.utf8)
            let buffer = ByteBuffer(bytes: bytes)
            let ours = Result { () throws(BatchError) in try validator.validate(buffer) }
            let theirs = Result { () throws(BatchError) in try reference.validate(buffer) }
            switch (ours, theirs) {
            case (.success(let a), .success(let b)):
                XCTAssertEqual(a.mpid, b.mpid, batch)
                XCTAssertEqual(a.eventCount, b.eventCount, batch)
                outcomes["accepted", default: 0] += 1
            case (.failure(let a), .failure(let b)):
                XCTAssertEqual(a, b, String(decoding: bytes, as: UTF8.self))
                outcomes[a.message.contains("not a JSON object") ? "syntax" : "field", default: 0] += 1
            default:
                XCTFail("round \(round): one-pass \(ours), reference \(theirs): \(String(decoding: bytes, as: UTF8.self))")
            }
        }
        // The generator reaches every outcome often.
        for kind in ["accepted", "syntax", "field"] { XCTAssertGreaterThan(outcomes[kind] ?? 0, 1000, "\(outcomes)") }
    }

    /// Skipping by structure (validated documents) finds the same members and elements as skipping
    /// with validation, whatever the strings hold.
    func testTrustedSkippingFindsTheSameRanges() throws {
        var rng = SeededRNG(state: 31)
        var compared = 0
        for _ in 0..<5_000 {
            var doc = Array(randomBatch(&rng).utf8)
            // A string member with escapes and multi-byte characters at a random word offset.
            let extra: [UInt8] = Array("\"k\":\"".utf8) + randomBody(&rng, invalidChance: 0) + Array("\", ".utf8)
            doc.insert(contentsOf: extra, at: 1)
            if doc[doc.count - 2] == UInt8(ascii: ",") { doc.remove(at: doc.count - 2) }
            try doc.withUnsafeBytes { raw in
                guard (try? JSON.validate(raw)) != nil else { return }
                compared += 1
                let checked = try JSON.members(raw)
                let trusted = try JSON.members(raw, trusted: true)
                XCTAssertEqual(checked.map(\.key), trusted.map(\.key))
                XCTAssertEqual(checked.map(\.range), trusted.map(\.range))
                for m in checked where JSON.kind(UnsafeRawBufferPointer(rebasing: raw[m.range])) == .array {
                    let value = UnsafeRawBufferPointer(rebasing: raw[m.range])
                    XCTAssertEqual(try JSON.elements(value), try JSON.elements(value, trusted: true))
                }
            }
        }
        XCTAssertGreaterThan(compared, 4_000)
    }

    /// The one-pass tree builder against the multi-pass one it replaced (validate, then each level
    /// split into members or elements and built again): same acceptance, same trees.
    func testOnePassTreeAgreesWithMultiPassReference() {
        var rng = SeededRNG(state: 11_2026)
        var accepted = 0
        for round in 0..<10_000 {
            let batch = randomBatch(&rng)
            var bytes = round % 3 == 0 ? mutate(batch, &rng) : Array(batch.utf8)
            if round % 5 == 0 {
                // A string with escapes and multi-byte characters, valid or not.
                bytes.insert(contentsOf: Array("\"k\\u0041\":\"".utf8) + randomBody(&rng, invalidChance: 5) + Array("\",".utf8), at: 1)
            }
            if round % 7 == 0 { bytes = Array("  \n".utf8) + bytes + Array("\t ".utf8) }
            let ours = bytes.withUnsafeBytes { raw in try? JSONValue.parse(raw) }
            let theirs = bytes.withUnsafeBytes { raw in Self.multiPassTree(raw) }
            XCTAssertEqual(ours, theirs, "round \(round): \(String(decoding: bytes, as: UTF8.self))")
            if ours != nil { accepted += 1 }
        }
        XCTAssertGreaterThan(accepted, 3_000)
        // The depth limit is the validator's (64 levels).
        for levels in [63, 64, 65, 66] {
            let doc = String(repeating: "[", count: levels) + String(repeating: "]", count: levels)
            XCTAssertEqual((try? JSONValue.parse(doc)) != nil, (try? JSON.validate(ByteBuffer(string: doc))) != nil, "\(levels)")
            XCTAssertEqual((try? JSONValue.parse(doc)) != nil, levels <= 64, "\(levels)")
        }
    }

    static func multiPassTree(_ bytes: UnsafeRawBufferPointer) -> JSONValue? {
        guard (try? JSON.validate(bytes)) != nil else { return nil }
        var start = 0
        var end = bytes.count
        func space(_ b: UInt8) -> Bool { b == 0x20 || b == 0x0A || b == 0x0D || b == 0x09 }
        while start < end, space(bytes[start]) { start += 1 }
        while end > start, space(bytes[end - 1]) { end -= 1 }
        func build(_ bytes: UnsafeRawBufferPointer) -> JSONValue {
            switch JSON.kind(bytes) {
            case .null: return .null
            case .bool: return .bool(bytes.first == UInt8(ascii: "t"))
            case .number: return .number(String(decoding: bytes, as: UTF8.self))
            case .string: return .string(JSON.string(bytes) ?? "")
            case .array:
                return .array(((try? JSON.elements(bytes, maxDepth: .max)) ?? []).map { build(UnsafeRawBufferPointer(rebasing: bytes[$0])) })
            case .object:
                return .object(
                    ((try? JSON.members(bytes, maxDepth: .max)) ?? []).map {
                        JSONValue.Member($0.key, build(UnsafeRawBufferPointer(rebasing: bytes[$0.range])))
                    })
            }
        }
        return build(UnsafeRawBufferPointer(rebasing: bytes[start..<end]))
    }
}
