import Foundation
import NIOCore

/// One event as Keen gets it: a JSON object for one collection.
public struct KeenEvent: Sendable, Equatable {
    public var collection: String
    public var payload: ByteBuffer
    /// What identifies the event across retries (also its `keen.uniqueness_token` when enabled).
    public var eventID: String
}

public struct KeenBatchOutput: Sendable {
    public var events: [KeenEvent] = []
    /// Events Keen would refuse (or skip silently): never sent, reported with the reason.
    public var rejected: [(index: Int, reason: String)] = []
}

extension KeenDestination {
    /// Keen skips events over 900 KB without telling anyone (seed 004).
    public static let maxEventBytes = 900_000
    /// The Kafka Inbound Cluster's `message.max.bytes` (seed 004).
    public static let maxMessageBytes = 1_048_588

    /// One Keen event per event of the batch: the event's data fields and `event_type` at the top
    /// level, the batch context under `mparticle` (as configured), Sluice's ids under `sluice`, and
    /// `keen.timestamp` (the event's time, ISO-8601 UTC) and `keen.uniqueness_token`. Property
    /// names Keen refuses are renamed by `keenPropertyName`, at every level.
    public func events(from batch: JSONValue, batchID: String?, receivedAt: Int64) -> KeenBatchOutput {
        var output = KeenBatchOutput()
        guard case .array(let events)? = batch["events"] else { return output }
        var context: [JSONValue.Member] = []
        func copy(_ key: String) { if let v = batch[key] { context.append(.init(key, v)) } }
        copy("mpid")
        copy("environment")
        copy("batch_id")
        copy("source_request_id")
        if includeUser {
            if let identities = batch["user_identities"] { context.append(.init("user_identities", Self.identityList(identities))) }
            copy("user_attributes")
        }
        if includeDevice { copy("device_info") }
        if includeApplication { copy("application_info") }
        let batchTime = batch["timestamp_unixtime_ms"]?.int64Value ?? receivedAt
        // The batch context is the same in every event: written once, copied into each.
        let contextBytes = Self.renamed(.object(context)).jsonBytes

        // A batch's events have a few types: each one's collection (a template filled in with
        // Foundation's `replacingOccurrences`, 12% of the mapping's time when done per event) and
        // its check, once per batch.
        var collections: [(type: String, name: String, problem: String?)] = []
        func collectionOf(_ type: String) -> (String, String?) {
            if let known = collections.first(where: { $0.type == type }) { return (known.name, known.problem) }
            let name = collection(eventType: type)
            let problem = Self.collectionProblem(name)
            collections.append((type, name, problem))
            return (name, problem)
        }

        for (index, event) in events.enumerated() {
            let type = event["event_type"]?.stringValue ?? "unknown"
            let (collection, collectionProblem) = collectionOf(type)
            if let problem = collectionProblem {
                output.rejected.append((index, "event \(index): \(problem)"))
                continue
            }
            let data = event["data"] ?? .object([])
            let eventID = Self.eventID(data["source_message_id"]?.stringValue, batchID: batchID, index: index)
            var members: [JSONValue.Member] = []
            if case .object(let fields) = data {
                // A field of the event's own called `keen` or `mparticle` or `sluice` keeps its value under another name.
                members = fields.map { ["keen", "mparticle", "sluice", "event_type"].contains($0.key) ? .init("data_" + $0.key, $0.value) : $0 }
            }
            // The event's own fields are renamed here; the batch context (the same for every event)
            // was renamed once for the batch; `event_type`, `mparticle`, `sluice` need no renaming.
            var object = Self.renamed(.object(members))
            guard case .object(var renamedMembers) = object else { continue }
            var names = Names(capacity: renamedMembers.count + 4)
            for m in renamedMembers { names.insert(m.key) }
            @discardableResult
            func add(_ key: String, _ value: JSONValue) -> String {
                var name = key
                var n = 2
                while names.contains(name) {
                    name = key + "_\(n)"
                    n += 1
                }
                names.insert(name)
                renamedMembers.append(.init(name, value))
                return name
            }
            add("event_type", .string(type))
            let contextName = add("mparticle", .null)  // its value: `contextBytes`, when written
            var sluice: [JSONValue.Member] = [.init("event_index", .number(String(index))), .init("event_id", .string(eventID))]
            if let batchID { sluice.insert(.init("batch_id", .string(batchID)), at: 0) }
            add("sluice", .object(sluice))
            object = .object(renamedMembers)
            var keen: [JSONValue.Member] = [
                .init("timestamp", .string(Self.iso8601(milliseconds: data["timestamp_unixtime_ms"]?.int64Value ?? batchTime)))
            ]
            if uniquenessToken { keen.append(.init("uniqueness_token", .string(eventID))) }
            object["keen"] = .object(keen)
            guard case .object(let final) = object else { continue }
            var bytes = ByteBuffer()
            bytes.reserveCapacity(contextBytes.readableBytes + 1024)
            bytes.writeStaticString("{")
            for (i, m) in final.enumerated() {
                if i > 0 { bytes.writeStaticString(",") }
                JSON.writeString(m.key, into: &bytes)
                bytes.writeStaticString(":")
                if m.key == contextName { bytes.writeImmutableBuffer(contextBytes) } else { m.value.write(into: &bytes) }
            }
            bytes.writeStaticString("}")
            guard bytes.readableBytes <= Self.maxEventBytes else {
                output.rejected.append(
                    (index, "event \(index) is \(bytes.readableBytes) bytes; Keen skips events over \(Self.maxEventBytes) bytes"))
                continue
            }
            output.events.append(KeenEvent(collection: collection, payload: bytes, eventID: eventID))
        }
        return output
    }

    /// The event's id: its `source_message_id` when that fits Keen's 64-character uniqueness
    /// token, a digest of it when longer, else the Sluice batch id and the event's position (the
    /// same across retries and replays of the spooled batch).
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

    /// Keen's property rules: no `.`, no leading `$`, fewer than 256 characters. The rule, applied
    /// at every level: `.` becomes `_`; a leading `$` (mParticle's reserved attributes such as
    /// `$FirstName`) becomes `mp_`; an empty name becomes `_`; a longer name is cut to 255
    /// characters. Where two names of one object end up equal, the later ones get `_2`, `_3`, ….
    public static func keenPropertyName(_ name: String) -> String {
        // Most names need nothing: no `.`, no leading `$`, not empty, short.
        let utf8 = name.utf8
        if !utf8.isEmpty, utf8.count < 256, utf8.first != UInt8(ascii: "$"), !utf8.contains(UInt8(ascii: ".")) { return name }
        // On the bytes, without Foundation.
        var bytes: [UInt8] = []
        bytes.reserveCapacity(utf8.count + 2)
        if utf8.first == UInt8(ascii: "$") { bytes.append(contentsOf: "mp_".utf8) }
        for b in utf8.dropFirst(utf8.first == UInt8(ascii: "$") ? 1 : 0) { bytes.append(b == UInt8(ascii: ".") ? UInt8(ascii: "_") : b) }
        if bytes.isEmpty { return "_" }
        let n = String(decoding: bytes, as: UTF8.self)
        return n.count > 255 ? String(n.prefix(255)) : n
    }

    static func renamed(_ value: JSONValue) -> JSONValue {
        switch value {
        case .object(let members):
            var used = Names(capacity: members.count)
            var out: [JSONValue.Member] = []
            out.reserveCapacity(members.count)
            for m in members {
                var name = keenPropertyName(m.key)
                if used.contains(name) {
                    var n = 2
                    while used.contains(String(name.prefix(250)) + "_\(n)") { n += 1 }
                    name = String(name.prefix(250)) + "_\(n)"
                }
                used.insert(name)
                out.append(.init(name, renamed(m.value)))
            }
            return .object(out)
        case .array(let items):
            return .array(items.map(renamed))
        default:
            return value
        }
    }

    /// The names taken in one object: a list while short (most objects have a few members, and
    /// hashing each name cost more than comparing it), a set beyond that.
    struct Names {
        private var list: [String] = []
        private var set: Set<String>?
        init(capacity: Int) {
            if capacity > 16 { set = Set(minimumCapacity: capacity) } else { list.reserveCapacity(capacity) }
        }
        func contains(_ name: String) -> Bool { set?.contains(name) ?? list.contains(name) }
        mutating func insert(_ name: String) {
            if set != nil { set!.insert(name) } else { list.append(name) }
        }
    }

    /// mParticle's inbound map form `{"customer_id": "…"}` as the outgoing list.
    static func identityList(_ identities: JSONValue) -> JSONValue {
        guard case .object(let map) = identities else { return identities }
        return .array(map.map { .object([.init("identity_type", .string($0.key)), .init("identity", $0.value)]) })
    }

    /// `2023-11-14T22:13:20.000Z`.
    public static func iso8601(milliseconds: Int64) -> String {
        var seconds = time_t(milliseconds >= 0 ? milliseconds / 1000 : (milliseconds - 999) / 1000)
        let ms = Int((milliseconds % 1000 + 1000) % 1000)
        var t = tm()
        gmtime_r(&seconds, &t)
        func pad(_ v: Int32, _ width: Int) -> String {
            let s = String(v)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        return "\(pad(t.tm_year + 1900, 4))-\(pad(t.tm_mon + 1, 2))-\(pad(t.tm_mday, 2))T\(pad(t.tm_hour, 2)):\(pad(t.tm_min, 2)):\(pad(t.tm_sec, 2)).\(pad(Int32(ms), 3))Z"
    }
}

extension JSONValue {
    /// An integer given as a JSON number or as a string of digits.
    public var int64Value: Int64? {
        switch self {
        case .number(let n): return Int64(n)
        case .string(let s): return Int64(s)
        default: return nil
        }
    }
}
