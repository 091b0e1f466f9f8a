import NIOCore
import NIOEmbedded
import NIOTestUtils
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

    func testDripFedAndManyFramesPerRead() throws {
        let frames = sampleFrames()
        let whole = encoded(frames)
        // ByteToMessageDecoderVerifier feeds byte by byte, all at once, and in between.
        try ByteToMessageDecoderVerifier.verifyDecoder(
            inputOutputPairs: [(whole, frames)],
            decoderFactory: { FrameDecoder() })
    }

    func channel(limit: Int = 1024) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder(maximumFrameLength: limit)))
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
