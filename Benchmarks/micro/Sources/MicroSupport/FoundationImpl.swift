import Foundation
import NIOCore
import Shared

/// The same work as Sluice's JSON layer, written the way a team would with Foundation alone:
/// JSONSerialization into `[String: Any]`, edit the dictionaries, serialise again; Codable for frames.
/// Each function produces the same logical output as its Sluice counterpart (same members and
/// values; Foundation does not keep member order, and re-prints numbers).
public enum FoundationImpl {
    // MARK: Validate

    /// What "validate" costs with Foundation: a full parse.
    @inline(never)
    public static func validate(_ data: Data) throws -> Any {
        try JSONSerialization.jsonObject(with: data)
    }

    // MARK: Kafka connection settings

    public struct KafkaOutput {
        public var messages: [Data] = []
        public var eventIDs: [String] = []
        public var unsupportedEvents = 0
        public var filteredEvents = 0
    }

    struct NotAnObject: Error {}

    /// `KafkaConnectionSettings.apply` with Foundation: parse, filter/edit, write (one message per
    /// batch, or one per event when `sendAsBatch` is false).
    @inline(never)
    public static func applyKafka(_ data: Data, settings s: KafkaConnectionSettings, receivedAt: Int64) throws -> KafkaOutput {
        guard var batch = try JSONSerialization.jsonObject(with: data) as? [String: Any] else { throw NotAnObject() }
        var output = KafkaOutput()
        var changed = false
        var events: [[String: Any]] = []
        var positions: [Int] = []
        if let all = batch["events"] as? [Any] {
            for (position, item) in all.enumerated() {
                guard var event = item as? [String: Any] else { continue }
                let type = event["event_type"] as? String ?? ""
                guard KafkaConnectionSettings.supportedEventTypes.contains(type) else {
                    output.unsupportedEvents += 1
                    changed = true
                    continue
                }
                guard s.forwards(eventType: type) else {
                    output.filteredEvents += 1
                    changed = true
                    continue
                }
                if !s.includeLocation, var d = event["data"] as? [String: Any], d["location"] != nil {
                    d["location"] = nil
                    event["data"] = d
                    changed = true
                }
                events.append(event)
                positions.append(position)
            }
            batch["events"] = events
        }
        if events.isEmpty && !s.sendBatchesWithoutEvents { return output }
        func remove(_ key: String) { if batch.removeValue(forKey: key) != nil { changed = true } }
        if !s.includeMetadata {
            remove("application_info")
            remove("device_info")
            remove("source_info")
        }
        if s.metadataFieldExclusion.contains(.deviceName), var info = batch["device_info"] as? [String: Any],
            info.removeValue(forKey: "device") != nil
        {
            batch["device_info"] = info
            changed = true
        }
        if s.metadataFieldExclusion.contains(.ipAddress) { remove("ip") }
        if !s.includeMPDeviceID { remove("mp_deviceid") }
        if !s.includeEventBatchLocation, var context = batch["context"] as? [String: Any],
            context.removeValue(forKey: "location") != nil
        {
            batch["context"] = context
            changed = true
        }
        let timestamp = batch["timestamp_unixtime_ms"] ?? NSNumber(value: receivedAt)
        if let map = batch["user_identities"] as? [String: Any] {
            batch["user_identities"] = map.map { key, value in
                ["identity_type": key, "identity": value, "timestamp_unixtime_ms": timestamp] as [String: Any]
            }
            changed = true
        }
        if let uniqueID = s.uniqueID {
            batch["unique_id"] = uniqueID
            changed = true
        }
        if s.sendAsBatch || events.isEmpty {
            output.messages = [changed ? try JSONSerialization.data(withJSONObject: batch) : data]
        } else {
            output.messages.reserveCapacity(events.count)
            for event in events {
                var one = batch
                one["events"] = [event]
                output.messages.append(try JSONSerialization.data(withJSONObject: one))
            }
            output.eventIDs = zip(events, positions).map { event, position in
                ((event["data"] as? [String: Any])?["source_message_id"] as? String) ?? (event["source_message_id"] as? String)
                    ?? "index:\(position)"
            }
        }
        return output
    }

    // MARK: Keen events

    public struct KeenEventOut {
        public var collection: String
        public var payload: Data
        public var eventID: String
    }

    nonisolated(unsafe) static let iso8601: ISO8601DateFormatter = {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        f.timeZone = TimeZone(identifier: "UTC")
        return f
    }()

    static func int64(_ v: Any?) -> Int64? {
        if let n = v as? Int64 { return n }
        if let s = v as? String { return Int64(s) }
        return nil
    }

    /// `KeenDestination.events` with Foundation: one Keen object per event (data fields at the top,
    /// batch context under `mparticle`, ids under `sluice`, `keen.timestamp` and uniqueness token,
    /// property names renamed by Keen's rules at every level), each serialised.
    @inline(never)
    public static func keenEvents(_ data: Data, destination: KeenDestination, batchID: String?, receivedAt: Int64) throws
        -> (events: [KeenEventOut], rejected: [String])
    {
        guard let batch = try JSONSerialization.jsonObject(with: data) as? [String: Any] else { throw NotAnObject() }
        var out: [KeenEventOut] = []
        var rejected: [String] = []
        guard let events = batch["events"] as? [Any] else { return (out, rejected) }
        var context: [String: Any] = [:]
        for key in ["mpid", "environment", "batch_id", "source_request_id"] { if let v = batch[key] { context[key] = v } }
        if destination.includeUser {
            if let ids = batch["user_identities"] {
                if let map = ids as? [String: Any] {
                    context["user_identities"] = map.map { ["identity_type": $0.key, "identity": $0.value] as [String: Any] }
                } else {
                    context["user_identities"] = ids
                }
            }
            if let v = batch["user_attributes"] { context["user_attributes"] = v }
        }
        if destination.includeDevice, let v = batch["device_info"] { context["device_info"] = v }
        if destination.includeApplication, let v = batch["application_info"] { context["application_info"] = v }
        let batchTime = int64(batch["timestamp_unixtime_ms"]) ?? receivedAt

        for (index, item) in events.enumerated() {
            let event = item as? [String: Any] ?? [:]
            let type = event["event_type"] as? String ?? "unknown"
            let collection = destination.collection(eventType: type)
            if let problem = KeenDestination.collectionProblem(collection) {
                rejected.append("event \(index): \(problem)")
                continue
            }
            let fields = event["data"] as? [String: Any] ?? [:]
            let eventID = Self.eventID(fields["source_message_id"] as? String, batchID: batchID, index: index)
            var object: [String: Any] = [:]
            for (key, value) in fields {
                object[["keen", "mparticle", "sluice", "event_type"].contains(key) ? "data_" + key : key] = value
            }
            object["event_type"] = type
            object["mparticle"] = context
            var sluice: [String: Any] = ["event_index": index, "event_id": eventID]
            if let batchID { sluice["batch_id"] = batchID }
            object["sluice"] = sluice
            var renamedObject = renamed(object) as! [String: Any]
            let ms = int64(fields["timestamp_unixtime_ms"]) ?? batchTime
            var keen: [String: Any] = ["timestamp": iso8601.string(from: Date(timeIntervalSince1970: Double(ms) / 1000))]
            if destination.uniquenessToken { keen["uniqueness_token"] = eventID }
            renamedObject["keen"] = keen
            let bytes = try JSONSerialization.data(withJSONObject: renamedObject)
            guard bytes.count <= KeenDestination.maxEventBytes else {
                rejected.append("event \(index) is \(bytes.count) bytes")
                continue
            }
            out.append(KeenEventOut(collection: collection, payload: bytes, eventID: eventID))
        }
        return (out, rejected)
    }

    static func eventID(_ sourceMessageID: String?, batchID: String?, index: Int) -> String {
        let id = sourceMessageID ?? "\(batchID ?? "batch"):\(index)"
        guard id.count > 64 else { return id }
        var a: UInt64 = 0xcbf2_9ce4_8422_2325
        var b: UInt64 = 0x8422_2325_cbf2_9ce4
        for byte in id.utf8 {
            a = (a ^ UInt64(byte)) &* 0x100_0000_01b3
            b = (b &* 0x100_0000_01b3) ^ UInt64(byte)
        }
        return "sha:" + String(a, radix: 16) + String(b, radix: 16)
    }

    static func renamed(_ value: Any) -> Any {
        if let object = value as? [String: Any] {
            var out: [String: Any] = [:]
            out.reserveCapacity(object.count)
            for (key, v) in object {
                var name = KeenDestination.keenPropertyName(key)
                if out[name] != nil {
                    var n = 2
                    while out[String(name.prefix(250)) + "_\(n)"] != nil { n += 1 }
                    name = String(name.prefix(250)) + "_\(n)"
                }
                out[name] = renamed(v)
            }
            return out
        }
        if let array = value as? [Any] { return array.map(renamed) }
        return value
    }

    // MARK: Frames

    /// A batch frame as a Codable struct, the batch JSON carried as a string (escaped inside the
    /// frame's JSON), as a Codable design would have it.
    public struct CodableFrame: Codable, Equatable {
        public var type: String
        public var id: UInt64
        public var tenant: String?
        public var destination: String?
        public var key: String?
        public var config: String?
        public var headers: [String: String]?
        public var payload: String?

        public init(_ frame: Frame) {
            type = frame.type.rawValue
            id = frame.id
            tenant = frame.tenant
            destination = frame.destination
            key = frame.key
            config = frame.config
            headers = frame.headers.map { Dictionary($0.map { ($0.name, $0.value) }, uniquingKeysWith: { $1 }) }
            payload = frame.payload.map { String(buffer: $0) }
        }
    }

    struct Truncated: Error {}

    /// 4-byte big-endian length, then the JSONEncoder's bytes.
    @inline(never)
    public static func encodeFrame(_ frame: CodableFrame, encoder: JSONEncoder) throws -> Data {
        let body = try encoder.encode(frame)
        var out = Data(capacity: body.count + 4)
        let n = UInt32(body.count).bigEndian
        withUnsafeBytes(of: n) { out.append(contentsOf: $0) }
        out.append(body)
        return out
    }

    @inline(never)
    public static func decodeFrame(_ data: Data, decoder: JSONDecoder) throws -> CodableFrame {
        guard data.count >= 4 else { throw Truncated() }
        let s = data.startIndex
        let length = Int(data[s]) << 24 | Int(data[s + 1]) << 16 | Int(data[s + 2]) << 8 | Int(data[s + 3])
        guard data.count >= 4 + length else { throw Truncated() }
        return try decoder.decode(CodableFrame.self, from: data[(s + 4)..<(s + 4 + length)])
    }
}

