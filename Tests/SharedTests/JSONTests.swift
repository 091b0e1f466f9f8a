import Foundation
import NIOCore
import XCTest

@testable import Shared

final class JSONTests: XCTestCase {
    func bytes(_ s: String) -> ByteBuffer { ByteBuffer(string: s) }

    func testInt64ExtremesSurviveByteForByte() throws {
        for literal in ["-9223372036854775808", "9223372036854775807", "9007199254740993", "-9007199254740993", "0"] {
            let doc = "{\"mpid\":\(literal),\"nested\":{\"ids\":[\(literal)]}}"
            let value = try JSONValue.parse(doc)
            XCTAssertEqual(value["mpid"], .number(literal))
            XCTAssertEqual(value.jsonString, doc, "parse → write must reproduce the document")
            let text = ByteBuffer(string: literal).withBytes { JSON.int64Text($0) }
            XCTAssertEqual(text, literal)
        }
    }

    func testInt64AcceptsStringsAndRejectsOthers() {
        func int64(_ json: String) -> String? { ByteBuffer(string: json).withBytes { JSON.int64Text($0) } }
        XCTAssertEqual(int64("\"-9223372036854775808\""), "-9223372036854775808")
        XCTAssertEqual(int64("\"9223372036854775807\""), "9223372036854775807")
        XCTAssertEqual(int64("\"00042\""), "42", "string ids are canonicalised so one user keeps one key")
        XCTAssertNil(int64("9223372036854775808"), "2^63 is out of range")
        XCTAssertNil(int64("-9223372036854775809"))
        XCTAssertNil(int64("1.5"))
        XCTAssertNil(int64("1e3"))
        XCTAssertNil(int64("\"12a\""))
        XCTAssertNil(int64("true"))
        XCTAssertNil(int64("null"))
    }

    func testValidDocumentsAreAccepted() throws {
        let docs = [
            "{}", "[]", " {\"a\" : [1, -0, 0.5, 1e10, 1E-2, 2.5e+3, true, false, null, \"x\"]} ", "\"\\u00e9\\ud83d\\ude00\"",
            "\"caf\u{e9} \u{1F600}\"", "[[[[]]]]", "{\"\":\"\"}", "123", "\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"",
        ]
        for doc in docs {
            XCTAssertNoThrow(try JSON.validate(bytes(doc)), doc)
        }
    }

    func testInvalidDocumentsAreRejectedWithAPosition() {
        let docs: [(String, String)] = [
            ("", "unexpected end"), ("{", "expected a string key"), ("{\"a\":}", "unexpected character"),
            ("[1,]", "unexpected character"), ("{\"a\":1,}", "expected a string key"), ("01", "leading zero"),
            ("1.", "digit expected"), ("-", "invalid number"), ("tru", "invalid literal"), ("\"abc", "unterminated"),
            ("\"\\x\"", "invalid escape"), ("\"\\ud800\"", "surrogate"), ("\"\\udc00\"", "surrogate"),
            ("\"a\u{01}b\"", "control character"), ("{} {}", "after the JSON value"), ("[1 2]", "expected ','"),
            ("{'a':1}", "expected a string key"), ("NaN", "unexpected character"),
        ]
        for (doc, expected) in docs {
            XCTAssertThrowsError(try JSON.validate(bytes(doc)), doc) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(doc): \(error)")
            }
        }
    }

    func testInvalidUTF8IsRejected() {
        let cases: [[UInt8]] = [
            [0x22, 0xC3, 0x22],  // truncated 2-byte sequence
            [0x22, 0xC0, 0xAF, 0x22],  // overlong
            [0x22, 0xED, 0xA0, 0x80, 0x22],  // encoded surrogate
            [0x22, 0xF4, 0x90, 0x80, 0x80, 0x22],  // above U+10FFFF
            [0x22, 0xFF, 0x22],
            [0x22, 0x80, 0x22],  // lone continuation byte
        ]
        for c in cases {
            XCTAssertThrowsError(try JSON.validate(ByteBuffer(bytes: c)), "\(c)") { error in
                XCTAssertTrue("\(error)".contains("UTF-8"), "\(error)")
            }
        }
    }

    func testDepthLimit() {
        let deep = String(repeating: "[", count: 65) + String(repeating: "]", count: 65)
        XCTAssertThrowsError(try JSON.validate(bytes(deep))) { XCTAssertTrue("\($0)".contains("nesting deeper")) }
        let ok = String(repeating: "[", count: 64) + String(repeating: "]", count: 64)
        XCTAssertNoThrow(try JSON.validate(bytes(ok)))
    }

    func testEscapesAreDecodedAndWrittenBack() throws {
        let value = try JSONValue.parse("{\"k\\u0041\":\"line\\nbreak \\\"q\\\" \\ud83d\\ude00 \\u0001\"}")
        XCTAssertEqual(value["kA"], .string("line\nbreak \"q\" \u{1F600} \u{01}"))
        let again = try JSONValue.parse(value.jsonString)
        XCTAssertEqual(again, value)
    }

    func testEditingFields() throws {
        var value = try JSONValue.parse("{\"a\":1,\"b\":{\"c\":2},\"d\":3}")
        value["b"] = nil
        value["d"] = .string("x")
        value["e"] = .number("-9223372036854775808")
        XCTAssertEqual(value.jsonString, "{\"a\":1,\"d\":\"x\",\"e\":-9223372036854775808}")
    }

    /// The scanner accepts exactly what Foundation's parser accepts on a set of tricky documents.
    /// (Foundation on Linux also accepts trailing commas such as `[1,]`, which RFC 8259 forbids and
    /// the scanner rejects: see testInvalidDocumentsAreRejectedWithAPosition.)
    func testAgreesWithFoundationOnAcceptance() {
        let docs = [
            "{\"a\":[1,2,{\"b\":null}]}", "{\"a\" 1}", "[\"\\u12\"]", "[-]", "[1e]", "[0.1e-5]", "[\"\\t\"]",
            "[\"\t\"]", "{\"a\":1}x", "[1.0e+]", "[-01]", "[\"\\ud83d\\ude00\"]", "[true,false,null]", "[tru]",
            "{\"a\":{\"b\":{\"c\":[[[]]]}}}", "[\"\\/\"]", "[1 ]", " [ ] ", "{\"\\u0000\":1}",
        ]
        for doc in docs {
            let ours = (try? JSON.validate(bytes(doc))) != nil
            let foundation = (try? JSONSerialization.jsonObject(with: Data(doc.utf8), options: [.fragmentsAllowed])) != nil
            XCTAssertEqual(ours, foundation, doc)
        }
    }

    func testShallowMembersGiveExactRanges() throws {
        let doc = ByteBuffer(string: "{\"a\": [1, 2] , \"b\" :{\"c\":\"d\"}}")
        let members = try doc.withBytes { raw in try JSON.members(raw) }
        XCTAssertEqual(members.map(\.key), ["a", "b"])
        XCTAssertEqual(String(buffer: doc.slice(members[0].range)), "[1, 2]")
        XCTAssertEqual(String(buffer: doc.slice(members[1].range)), "{\"c\":\"d\"}")
    }
}
