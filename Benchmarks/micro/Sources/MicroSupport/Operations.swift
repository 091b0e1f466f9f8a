import Foundation
import NIOCore
import Shared

/// Every measured operation by name, over one prepared input, returning a number that depends on
/// the work (so nothing is optimised away). The benchmark suite and the profile driver share these.
public struct Operation {
    public let name: String
    public let input: String
    /// Bytes of the input batch each run processes (for MB/s).
    public let bytes: Int
    public let run: () -> Int

    public static let names = [
        "validate", "batch-validate", "parse-tree", "foundation-validate",
        "splice", "apply", "apply-tree", "foundation-apply",
        "splice-split", "split", "split-tree", "foundation-split",
        "frame-encode", "frame-decode", "foundation-frame-encode", "foundation-frame-decode",
        "frame-encode-split", "frame-decode-split",
        "keen", "keen-tree", "foundation-keen",
    ]

    // Decoding/encoding through JSONDecoder/JSONEncoder instances made once, as a program would.
    static let encoder = JSONEncoder()
    static let decoder = JSONDecoder()

    public static func make(_ name: String, input: String) -> Operation {
        let buffer = Inputs.named(input)
        let data = Inputs.data(buffer)
        let tree = try! JSONValue.parse(buffer)
        let batchSettings = Inputs.kafkaSettings(sendAsBatch: true)
        let eventSettings = Inputs.kafkaSettings(sendAsBatch: false)
        let validator = BatchValidator()
        let frame = Inputs.batchFrame(buffer)
        var encodedFrame = ByteBuffer()
        frame.encode(into: &encodedFrame)
        let splitFrame = Inputs.splitFrame(try! eventSettings.splice(buffer, receivedAt: Inputs.receivedAt))
        var encodedSplitFrame = ByteBuffer()
        splitFrame.encode(into: &encodedSplitFrame)
        let codableFrame = FoundationImpl.CodableFrame(frame)
        let encodedCodable = try! FoundationImpl.encodeFrame(codableFrame, encoder: encoder)
        let receivedAt = Inputs.receivedAt
        let run: () -> Int
        switch name {
        case "validate":
            run = { (try? JSON.validate(buffer)) == nil ? 0 : 1 }
        case "batch-validate":
            run = { (try? validator.validate(buffer))?.eventCount ?? -1 }
        case "parse-tree":
            run = { (try? JSONValue.parse(buffer)) == nil ? 0 : 1 }
        case "foundation-validate":
            run = { (try? FoundationImpl.validate(data)) == nil ? 0 : 1 }
        case "splice":
            // What the router does per batch and Kafka destination since 2357620: splice the bytes.
            run = { try! batchSettings.splice(buffer, receivedAt: receivedAt).messages.reduce(0) { $0 + $1.readableBytes } }
        case "splice-split":
            run = { try! eventSettings.splice(buffer, receivedAt: receivedAt).messages.reduce(0) { $0 + $1.readableBytes } }
        case "apply":
            // The tree-based reference (what the router did before 2357620): parse into the tree, apply. per batch and Kafka destination: parse into the tree, apply.
            run = {
                let t = try! JSONValue.parse(buffer)
                return batchSettings.apply(to: t, original: buffer, receivedAt: receivedAt).messages.reduce(0) { $0 + $1.readableBytes }
            }
        case "apply-tree":
            run = { batchSettings.apply(to: tree, original: buffer, receivedAt: receivedAt).messages.reduce(0) { $0 + $1.readableBytes } }
        case "foundation-apply":
            run = {
                try! FoundationImpl.applyKafka(data, settings: batchSettings, receivedAt: receivedAt).messages.reduce(0) { $0 + $1.count }
            }
        case "split":
            run = {
                let t = try! JSONValue.parse(buffer)
                return eventSettings.apply(to: t, original: buffer, receivedAt: receivedAt).messages.reduce(0) { $0 + $1.readableBytes }
            }
        case "split-tree":
            run = { eventSettings.apply(to: tree, original: buffer, receivedAt: receivedAt).messages.reduce(0) { $0 + $1.readableBytes } }
        case "foundation-split":
            run = {
                try! FoundationImpl.applyKafka(data, settings: eventSettings, receivedAt: receivedAt).messages.reduce(0) { $0 + $1.count }
            }
        case "frame-encode":
            run = {
                var out = ByteBuffer()
                frame.encode(into: &out)
                return out.readableBytes
            }
        case "frame-decode":
            run = {
                var input = encodedFrame
                return (try! FrameDecoder().next(&input))!.payload!.readableBytes
            }
        case "frame-encode-split":
            // The router's frame of a batch's per-event messages: a part (length, topic, event
            // id) per message, the messages as the payload.
            run = {
                var out = ByteBuffer()
                splitFrame.encode(into: &out)
                return out.readableBytes
            }
        case "frame-decode-split":
            // kafka-out's side: decode it and cut out the messages.
            run = {
                var input = encodedSplitFrame
                return try! (try! FrameDecoder().next(&input))!.messages().count
            }
        case "foundation-frame-encode":
            run = { try! FoundationImpl.encodeFrame(codableFrame, encoder: encoder).count }
        case "foundation-frame-decode":
            run = { try! FoundationImpl.decodeFrame(encodedCodable, decoder: decoder).payload!.utf8.count }
        case "keen":
            run = {
                let t = try! JSONValue.parse(buffer)
                return Inputs.keen.events(from: t, batchID: Inputs.batchID, receivedAt: receivedAt).events.reduce(0) { $0 + $1.payload.readableBytes }
            }
        case "keen-tree":
            run = { Inputs.keen.events(from: tree, batchID: Inputs.batchID, receivedAt: receivedAt).events.reduce(0) { $0 + $1.payload.readableBytes } }
        case "foundation-keen":
            run = {
                try! FoundationImpl.keenEvents(data, destination: Inputs.keen, batchID: Inputs.batchID, receivedAt: receivedAt).events
                    .reduce(0) { $0 + $1.payload.count }
            }
        default:
            fatalError("unknown operation \(name); one of \(names.joined(separator: ", "))")
        }
        return Operation(name: name, input: input, bytes: buffer.readableBytes, run: run)
    }
}
