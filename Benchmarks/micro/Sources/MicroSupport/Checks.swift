import Foundation
import NIOCore
import Shared

/// Before anything is timed: each Foundation counterpart must produce the same documents as
/// Sluice's code on the benchmark inputs (compared after parsing, with keys sorted and the
/// identity lists — built from an unordered dictionary on Foundation's side — sorted too).
public enum Checks {
    struct Mismatch: Error, CustomStringConvertible {
        var description: String
    }

    static func canonical(_ value: Any) -> Any {
        if let object = value as? [String: Any] { return object.mapValues(canonical) }
        if let array = value as? [Any] {
            let items = array.map(canonical)
            if items.allSatisfy({ ($0 as? [String: Any])?["identity_type"] != nil }) {
                return items.sorted { (($0 as! [String: Any])["identity_type"] as! String) < (($1 as! [String: Any])["identity_type"] as! String) }
            }
            return items
        }
        return value
    }

    static func canonicalText(_ data: Data) throws -> String {
        let value = canonical(try JSONSerialization.jsonObject(with: data))
        return String(decoding: try JSONSerialization.data(withJSONObject: value, options: [.sortedKeys]), as: UTF8.self)
    }

    static func same(_ what: String, _ sluice: [ByteBuffer], _ foundation: [Data]) throws {
        guard sluice.count == foundation.count else {
            throw Mismatch(description: "\(what): \(sluice.count) messages from Sluice, \(foundation.count) from Foundation")
        }
        for (i, (a, b)) in zip(sluice, foundation).enumerated() {
            let ta = try canonicalText(Data(a.readableBytesView))
            let tb = try canonicalText(b)
            guard ta == tb else { throw Mismatch(description: "\(what): message \(i) differs:\n  sluice:     \(ta)\n  foundation: \(tb)") }
        }
    }

    /// Throws on the first difference; returns a one-line summary per check.
    public static func run() throws -> [String] {
        var lines: [String] = []
        for name in ["large", "small"] {
            let buffer = Inputs.named(name)
            let data = Inputs.data(buffer)
            let tree = try JSONValue.parse(buffer)
            _ = try FoundationImpl.validate(data)
            for asBatch in [true, false] {
                let settings = Inputs.kafkaSettings(sendAsBatch: asBatch)
                let s = settings.apply(to: tree, original: buffer, receivedAt: Inputs.receivedAt)
                let f = try FoundationImpl.applyKafka(data, settings: settings, receivedAt: Inputs.receivedAt)
                let spliced = try settings.splice(buffer, receivedAt: Inputs.receivedAt)
                try same("kafka \(name) send_as_batch=\(asBatch)", s.messages, f.messages)
                try same("kafka splice \(name) send_as_batch=\(asBatch)", spliced.messages, f.messages)
                guard s.eventIDs == f.eventIDs, spliced.eventIDs == f.eventIDs else {
                    throw Mismatch(description: "kafka \(name): event ids differ")
                }
                lines.append(
                    "kafka \(name) send_as_batch=\(asBatch): \(s.messages.count) message(s), "
                        + "\(s.messages.map(\.readableBytes).reduce(0, +)) bytes from Sluice, \(f.messages.map(\.count).reduce(0, +)) from Foundation: same documents (tree apply and splice)"
                )
            }
            let k = Inputs.keen.events(from: tree, batchID: Inputs.batchID, receivedAt: Inputs.receivedAt)
            let fk = try FoundationImpl.keenEvents(data, destination: Inputs.keen, batchID: Inputs.batchID, receivedAt: Inputs.receivedAt)
            try same("keen \(name)", k.events.map(\.payload), fk.events.map(\.payload))
            guard k.events.map(\.collection) == fk.events.map(\.collection), k.events.map(\.eventID) == fk.events.map(\.eventID) else {
                throw Mismatch(description: "keen \(name): collections or event ids differ")
            }
            lines.append("keen \(name): \(k.events.count) events: same documents, collections and ids")

            let frame = Inputs.batchFrame(buffer)
            var encoded = ByteBuffer()
            frame.encode(into: &encoded)
            guard let decoded = try FrameDecoder().next(&encoded), decoded == frame else {
                throw Mismatch(description: "frame \(name) does not round-trip")
            }
            let codable = FoundationImpl.CodableFrame(frame)
            let fData = try FoundationImpl.encodeFrame(codable, encoder: JSONEncoder())
            guard try FoundationImpl.decodeFrame(fData, decoder: JSONDecoder()) == codable else {
                throw Mismatch(description: "codable frame \(name) does not round-trip")
            }
            var sized = ByteBuffer()
            frame.encode(into: &sized)
            lines.append("frame \(name): \(sized.readableBytes) bytes (Sluice, payload embedded), \(fData.count) bytes (Codable, payload as an escaped string); both round-trip")
        }
        return lines
    }
}
