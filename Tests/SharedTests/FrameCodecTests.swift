import NIOCore
import NIOEmbedded
import XCTest

@testable import Shared

final class FrameCodecTests: XCTestCase {
    func sampleFrames() -> [Frame] {
        var batch = Frame(type: .batch, id: 42)
        batch.tenant = "demo"
        batch.key = "-9223372036854775808"
        batch.headers = [Header("sluice-batch-id", "abc-1"), Header("sluice-event-id", "e\"1")]
        batch.payload = ByteBuffer(string: "{\"environment\":\"production\",\"mpid\":-9223372036854775808,\"events\":[]}")
        var nack = Frame.nack(7, reason: "broker said \"no\"\n", retryable: true)
        nack.destination = "demo/events#1"
        return [.hello(role: .kafkaOut, instance: "ko-1"), batch, .ack(1), nack, .error(code: "X", message: "é \u{1F600}")]
    }

    func encoded(_ frames: [Frame]) -> ByteBuffer {
        var buffer = ByteBuffer()
        for f in frames { f.encode(into: &buffer) }
        return buffer
    }

    func testRoundTripAndPayloadStaysRawJSON() throws {
        var buffer = encoded(sampleFrames())
        var decoded: [Frame] = []
        let decoder = FrameDecoder()
        while let f = try decoder.next(&buffer) { decoded.append(f) }
        XCTAssertEqual(decoded, sampleFrames())
        // The payload is embedded JSON, not an escaped string.
        let wire = String(buffer: encoded([sampleFrames()[1]]).getSlice(at: 4, length: encoded([sampleFrames()[1]]).readableBytes - 4)!)
        XCTAssertTrue(wire.contains("\"payload\":{\"environment\""), wire)
    }

    /// What goes on the socket: the same bytes as `encode(into:)`, in one buffer per frame when its
    /// payload is small, else the fields, the payload's own buffer (not copied) and the closing
    /// brace — and each buffer sized for its frame, whatever came before (NIO's
    /// `MessageToByteHandler` gave every queued frame a buffer as large as the largest one yet).
    func testFrameWriterWritesTheEncodedBytesWithoutCopyingLargePayloads() throws {
        let channel = EmbeddedChannel(handler: FrameWriter())
        var large = sampleFrames()[1]
        let message = ByteBuffer(string: "{\"s\":\"" + String(repeating: "0123456789", count: 300) + "\"}")
        (large.payload, large.parts) = Frame.pack([(message, nil, "e1"), (message, "other", nil)])
        let frames = sampleFrames() + [large, .ack(99)]
        for frame in frames { channel.write(frame, promise: nil) }
        channel.flush()
        var written: [ByteBuffer] = []
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { written.append(buffer) }
        XCTAssertEqual(written.count, frames.count + 2)
        var joined = ByteBuffer()
        for var b in written { joined.writeBuffer(&b) }
        XCTAssertEqual(joined, encoded(frames))
        XCTAssertEqual(written[frames.count - 1].readableBytesView.first, large.payload!.readableBytesView.first)
        XCTAssertEqual(written[frames.count - 1].readableBytes, large.payload!.readableBytes)
        XCTAssertEqual(String(buffer: written[frames.count]), "}")
        XCTAssertLessThan(written.last!.capacity, 1024, "an ack after a large frame gets a small buffer")
        var decoded: [Frame] = []
        while let f = try FrameDecoder().next(&joined) { decoded.append(f) }
        XCTAssertEqual(decoded, frames)
        XCTAssertTrue(try channel.finish().isClean)
    }

    /// A forwarded payload is found by its structure, not parsed again: its bytes come out exactly
    /// as sent (strings holding brackets and escaped quotes included); a frame without a payload
    /// value is refused.
    func testPayloadIsSkippedByStructure() throws {
        let payload = "{\"a\":\"}]\\\"[{\",\"b\":[1,{\"c\":\"\\\\\"}],\"d\":-0.5e3}"
        let bodies = [
            "{\"type\":\"batch\",\"id\":3,\"payload\":\(payload)}", "{\"type\":\"batch\",\"payload\": \(payload) ,\"id\":3}",
            // With its length the payload is stepped over; a length that does not fit is ignored.
            "{\"type\":\"batch\",\"id\":3,\"payload_bytes\":\(payload.utf8.count),\"payload\":\(payload)}",
            "{\"type\":\"batch\",\"id\":3,\"payload_bytes\":9999,\"payload\":\(payload)}",
            "{\"type\":\"batch\",\"id\":3,\"payload_bytes\":3,\"payload\":\(payload)}",
        ]
        for body in bodies {
            let frame = try Frame.decode(body: ByteBuffer(string: body))
            XCTAssertEqual(frame.payload.map { String(buffer: $0) }, payload)
            XCTAssertEqual(frame.id, 3)
        }
        XCTAssertThrowsError(try Frame.decode(body: ByteBuffer(string: "{\"type\":\"batch\",\"payload\":}")))
        XCTAssertThrowsError(try Frame.decode(body: ByteBuffer(string: "{\"type\":\"batch\",\"payload\":{\"a\":1}")))
    }

    /// A batch's per-event messages travel in one frame: the payload is their array, the parts
    /// give each one's length, topic and event id; the receiver cuts them out by length.
    func testSeveralMessagesInOneFrameAreCutByTheirParts() throws {
        let messages = [#"{"a":"],[","b":1}"#, "[1,2]", #"{"c":"\u00e9"}"#, "{}"]
        let topics = [nil, "purchases", nil, "caf\u{e9}"]
        // Ids and topics written as they are, and one that needs escapes.
        let ids = ["e0", "e1", nil, "q\"x\\\n"]
        var frame = Frame(type: .batch, id: 9)
        (frame.payload, frame.parts) = Frame.pack(messages.indices.map { (ByteBuffer(string: messages[$0]), topics[$0], ids[$0]) })
        frame.destination = "acme/a#1"
        frame.headers = [Header("sluice-batch-id", "b-1")]
        var wire = encoded([frame])
        let text = String(buffer: wire)
        XCTAssertTrue(text.contains(#""parts":[[17,null,"e0"],[5,"purchases","e1"],[14,null,null],[2,"café","q\"x\\\n"]]"#), text)
        let decoded = try XCTUnwrap(try FrameDecoder().next(&wire))
        XCTAssertEqual(decoded, frame)
        let cut = try decoded.messages()
        XCTAssertEqual(cut.map { String(buffer: $0.payload) }, messages)
        XCTAssertEqual(cut.map { $0.part?.topic }, topics)
        XCTAssertEqual(cut.map { $0.part?.eventID }, ids)
        // A frame without parts is one message: its payload.
        XCTAssertEqual(try sampleFrames()[1].messages().map { String(buffer: $0.payload) }, [String(buffer: sampleFrames()[1].payload!)])
    }

    func testPartsThatDoNotMatchThePayloadAreRefused() throws {
        func body(_ parts: String, _ payload: String) -> ByteBuffer {
            ByteBuffer(string: #"{"type":"batch","id":1,"parts":\#(parts),"payload":\#(payload)}"#)
        }
        let refused: [(String, String)] = [
            ("[[3,null,null]]", "[{},{}]"),  // the payload has more than its parts
            ("[[2,null,null],[3,null,null]]", "[{},{}]"),  // a length that ends inside an element
            ("[[9,null,null]]", "[{}]"),  // a length beyond the payload
            ("[[0,null,null]]", "[{}]"),
            ("[]", "[{}]"),
            ("[[2,null,null]]", "{\"a\":{}}"),  // not an array
        ]
        for (parts, payload) in refused {
            let frame = try Frame.decode(body: body(parts, payload))
            XCTAssertThrowsError(try frame.messages(), "\(parts) \(payload)")
        }
        let malformed = [
            "{}", "[[2]]", "[[\"2\",null,null]]", "[[2,1,null]]", "[[02,null,null]]", "[[-2,null,null]]", "[[2.0,null,null]]",
            "[[2,null]]", "[[2,null,null,null]]", "[[2,nul,null]]", "[[2,null,\"\\x\"]]", "[[2,null,null],]", "[[2,null,null]",
            "[[,null,null]]", "[2,null,null]",
        ]
        for parts in malformed {
            XCTAssertThrowsError(try Frame.decode(body: body(parts, "[{}]")), parts) { error in
                XCTAssertEqual((error as? FrameError)?.code, "FRAME_INVALID")
            }
        }
        XCTAssertEqual(try Frame.decode(body: body("[[2,null,null],[2,\"t\",\"e\"]]", "[{},[]]")).messages().count, 2)
        // Whitespace anywhere JSON allows it, escapes decoded.
        let spaced = try Frame.decode(body: body(" [ [ 2 , null , \"e\\u0031\" ] , [0,\"t\",null] ] ", "[{},]"))
        XCTAssertEqual(spaced.parts, [Frame.Part(bytes: 2, eventID: "e1"), Frame.Part(bytes: 0, topic: "t")])
    }

    /// Some messages of a frame failed: one nack lists them (the others were delivered).
    func testANackListsTheMessagesThatFailed() throws {
        let failed = [FailedPart(index: 0, reason: "MSG_SIZE_TOO_LARGE", retryable: false), FailedPart(index: 3, reason: "t\"o", retryable: true)]
        var wire = encoded([.nack(5, failed: failed), .nack(6, reason: "all", retryable: true), .ack(7)])
        let decoder = FrameDecoder()
        let frames = [try decoder.next(&wire), try decoder.next(&wire), try decoder.next(&wire)].compactMap { $0 }
        XCTAssertEqual(frames[0].failedParts, failed)
        XCTAssertEqual(frames[0].retryable, false, "retryable only when every failure is")
        XCTAssertEqual(frames[0].reason, "MSG_SIZE_TOO_LARGE")
        XCTAssertNil(frames[1].failedParts, "a nack for the whole frame")
        XCTAssertNil(frames[2].failedParts)
    }

    /// The same frames whatever the reads' sizes: one byte at a time, frames cut anywhere (in
    /// the length prefix, in a large payload), many frames in one read, all at once.
    func testFramesCutAnywhereByTheReads() throws {
        var large = sampleFrames()[1]
        let message = ByteBuffer(string: "{\"s\":\"" + String(repeating: "0123456789", count: 500) + "\"}")
        (large.payload, large.parts) = Frame.pack([(message, nil, "e1"), (message, "other", nil)])
        let frames = sampleFrames() + [large, .ack(9)] + sampleFrames()
        let whole = encoded(frames)
        var generator = SeededRNG(state: 20)
        var splits: [[Int]] = [[1], [2], [3], [5], [7], [64], [1000], [whole.readableBytes]]
        for _ in 0..<20 { splits.append((0..<8).map { _ in Int(generator.next() % 700) + 1 }) }
        for sizes in splits {
            let channel = try channel(limit: 1 << 20)
            var input = whole
            var i = 0
            while input.readableBytes > 0 {
                try channel.writeInbound(input.readSlice(length: min(sizes[i % sizes.count], input.readableBytes))!)
                i += 1
            }
            var decoded: [Frame] = []
            while let frame = try channel.readInbound(as: Frame.self) { decoded.append(frame) }
            XCTAssertEqual(decoded, frames, "reads of \(sizes)")
            XCTAssertNoThrow(try channel.finish(), "nothing left over")
        }
    }

    /// After a bad frame the connection's later bytes are not decoded.
    func testNothingIsDecodedAfterABadFrame() throws {
        let channel = try channel()
        var bad = ByteBuffer()
        bad.writeInteger(UInt32(8))
        bad.writeString("not json")
        XCTAssertThrowsError(try channel.writeInbound(bad))
        XCTAssertNoThrow(try channel.writeInbound(encoded([.ack(1)])))
        XCTAssertNil(try channel.readInbound(as: Frame.self))
    }

    func channel(limit: Int = 1024) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(FrameSplitter(maximumFrameLength: limit))
        return channel
    }

    func testOversizeFrameIsRejectedBeforeItsBodyArrives() throws {
        let channel = try channel(limit: 100)
        var header = ByteBuffer()
        header.writeInteger(UInt32(101))
        XCTAssertThrowsError(try channel.writeInbound(header)) { error in
            XCTAssertEqual(error as? FrameError, .oversize(length: 101, limit: 100))
        }
    }

    func testTruncatedFrameAtEOF() throws {
        let channel = try channel()
        var buffer = encoded([.ack(1)])
        buffer.moveWriterIndex(to: buffer.writerIndex - 3)
        try channel.writeInbound(buffer)
        XCTAssertThrowsError(try channel.finish()) { error in
            guard case .truncated(let missing) = error as? FrameError else { return XCTFail("\(error)") }
            XCTAssertEqual(missing, 3)
        }
        let cutInPrefix = try self.channel()
        try cutInPrefix.writeInbound(encoded([.ack(1)]).getSlice(at: 0, length: 1)!)
        XCTAssertThrowsError(try cutInPrefix.finish()) { error in
            XCTAssertEqual(error as? FrameError, .truncated(missing: 3))
        }
    }

    func testNonJSONAndInvalidUTF8AndMissingType() throws {
        func frame(_ body: [UInt8]) -> ByteBuffer {
            var b = ByteBuffer()
            b.writeInteger(UInt32(body.count))
            b.writeBytes(body)
            return b
        }
        let cases: [([UInt8], String)] = [
            (Array("not json".utf8), "FRAME_NOT_JSON"),
            ([0x7B, 0x22, 0x74, 0x79, 0x70, 0x65, 0x22, 0x3A, 0x22, 0xFF, 0x22, 0x7D], "FRAME_NOT_JSON"),  // {"type":"\xFF"}
            (Array("{\"id\":1}".utf8), "FRAME_INVALID"),
            (Array("{\"type\":\"bogus\"}".utf8), "FRAME_INVALID"),
            (Array("{\"type\":\"ack\",\"id\":-1}".utf8), "FRAME_INVALID"),
            (Array("[1,2]".utf8), "FRAME_NOT_JSON"),
        ]
        for (body, code) in cases {
            let channel = try channel()
            XCTAssertThrowsError(try channel.writeInbound(frame(body))) { error in
                XCTAssertEqual((error as? FrameError)?.code, code, "\(String(decoding: body, as: UTF8.self))")
            }
        }
    }

    func testUnknownFieldsAreIgnoredForForwardCompatibility() throws {
        var b = ByteBuffer()
        let body = "{\"type\":\"ack\",\"id\":5,\"future\":{\"x\":[1]}}"
        b.writeInteger(UInt32(body.utf8.count))
        b.writeString(body)
        XCTAssertEqual(try FrameDecoder().next(&b), .ack(5))
    }
}
