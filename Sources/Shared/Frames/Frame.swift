import NIOCore

/// The protocol version spoken on Sluice's Unix sockets. A peer with another version is refused.
/// Version 2: a batch frame to an output may carry several messages (`parts`).
public let frameProtocolVersion = 2

/// What a frame is for.
public enum FrameType: String, Sendable {
    /// First frame of a connection: protocol version, role and instance id.
    case hello
    /// A batch: ingest → router (with tenant), router → output (with destination and key).
    case batch
    /// A destination's resolved settings, sent by the router before the first batch that uses it.
    case destination
    /// The frame with this id was handled.
    case ack
    /// The frame with this id failed; `reason` says why and `retryable` whether trying again can help.
    case nack
    /// The peer broke the protocol; the connection is closed after this frame.
    case error
    /// Router → ingest: the live output instances per kind and whether every kind the config
    /// needs has one (payload `{"ready":true,"outputs":{"kafka-out":2,...}}`), sent on every change.
    case outputs
    /// An operator's status request (from an `admin` peer) and the router's answer (payload).
    case status
}

/// The role a process announces in its `hello`.
public enum PeerRole: String, Sendable, CaseIterable {
    case ingest
    case kafkaOut = "kafka-out"
    case keenOut = "keen-out"
    /// A short-lived operator connection (`ingest status`): asks, reads the answer, leaves.
    case admin
}

public struct Header: Sendable, Equatable {
    public var name: String
    public var value: String
    public init(_ name: String, _ value: String) {
        self.name = name
        self.value = value
    }
}

/// One length-prefixed JSON frame. On the wire: 4-byte big-endian length, then a JSON object.
/// `payload` is carried as raw embedded JSON (never as an escaped string), so a process that only
/// forwards it does not rebuild it.
public struct Frame: Sendable, Equatable {
    public var type: FrameType
    public var id: UInt64
    public var version: Int?
    public var role: String?
    public var instance: String?
    public var tenant: String?
    public var destination: String?
    public var key: String?
    public var reason: String?
    public var retryable: Bool?
    public var code: String?
    public var message: String?
    /// On batches from ingest: the digest of the config file ingest runs on, so the router can
    /// catch up with a reload before routing (see `ConfigWatcher.digest`).
    public var config: String?
    /// On batches to outputs: where this message goes when it is not the destination's own topic
    /// (a Keen collection derived from the event type).
    public var topic: String?
    /// Kafka message headers (name, value), for batches sent to outputs.
    public var headers: [Header]?
    /// Raw JSON (a batch, or a destination's settings). Must be a valid JSON document.
    public var payload: ByteBuffer?
    /// Several messages in one frame (router → output: a batch's events for one destination, so
    /// a hop costs a frame and an answer per batch, not per event). `payload` is then a JSON array
    /// of the messages, and each part gives its message's length in bytes and, where it has them,
    /// its own topic and event id (sent as the `sluice-event-id` header, after the frame's
    /// `headers`). Answered with one `ack` when every message was delivered, or one `nack` whose
    /// payload lists the messages that failed (see `FrameOutcome`).
    public var parts: [Part]?

    public struct Part: Sendable, Equatable {
        public var bytes: Int
        public var topic: String?
        public var eventID: String?
        public init(bytes: Int, topic: String? = nil, eventID: String? = nil) {
            self.bytes = bytes
            self.topic = topic
            self.eventID = eventID
        }

        /// Writes `[[bytes,topic,eventID],…]` (null for a missing string) in one write: a frame
        /// has a part per event, and ByteBuffer checks capacity and ownership on every write.
        static func write(_ parts: [Part], into out: inout ByteBuffer) {
            // Per part: brackets, commas and up to 20 digits, "null" for a missing string (two
            // bytes more than an empty one) — 48 is ample —, and each string's most.
            var room = 2
            for p in parts {
                room += 48 + JSON.maxStringBytes(p.topic?.utf8.count ?? 0) + JSON.maxStringBytes(p.eventID?.utf8.count ?? 0)
            }
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: room) { b in
                var i = 0
                func put(_ text: String?) {
                    b[i] = UInt8(ascii: ",")
                    i += 1
                    if let text {
                        i += JSON.withUTF8(text) { b.putString($0, at: i) }
                    } else {
                        UnsafeMutableRawBufferPointer(rebasing: b[i..<(i + 4)]).copyBytes(from: "null".utf8)
                        i += 4
                    }
                }
                b[i] = UInt8(ascii: "[")
                i += 1
                for k in parts.indices {
                    if k > 0 {
                        b[i] = UInt8(ascii: ",")
                        i += 1
                    }
                    b[i] = UInt8(ascii: "[")
                    i += 1
                    i += b.putDecimal(parts[k].bytes, at: i)
                    put(parts[k].topic)
                    put(parts[k].eventID)
                    b[i] = UInt8(ascii: "]")
                    i += 1
                }
                b[i] = UInt8(ascii: "]")
                return i + 1
            }
        }
    }

    public init(type: FrameType, id: UInt64 = 0) {
        self.type = type
        self.id = id
    }

    public static func hello(role: PeerRole, instance: String) -> Frame {
        var f = Frame(type: .hello)
        f.version = frameProtocolVersion
        f.role = role.rawValue
        f.instance = instance
        return f
    }

    public static func ack(_ id: UInt64) -> Frame { Frame(type: .ack, id: id) }

    public static func nack(_ id: UInt64, reason: String, retryable: Bool) -> Frame {
        var f = Frame(type: .nack, id: id)
        f.reason = reason
        f.retryable = retryable
        return f
    }

    public static func error(code: String, message: String) -> Frame {
        var f = Frame(type: .error)
        f.code = code
        f.message = message
        return f
    }
}

/// Why a frame could not be read. Each is answered with an `error` frame and the connection closed.
public enum FrameError: Error, Equatable, CustomStringConvertible, Sendable {
    case oversize(length: Int, limit: Int)
    case invalidJSON(JSONError)
    case invalidFrame(String)
    case truncated(missing: Int)

    public var code: String {
        switch self {
        case .oversize: return "FRAME_TOO_LARGE"
        case .invalidJSON: return "FRAME_NOT_JSON"
        case .invalidFrame: return "FRAME_INVALID"
        case .truncated: return "FRAME_TRUNCATED"
        }
    }

    public var description: String {
        switch self {
        case .oversize(let length, let limit): return "frame of \(length) bytes exceeds the limit of \(limit) bytes"
        case .invalidJSON(let e): return "frame is not valid JSON: \(e)"
        case .invalidFrame(let why): return "invalid frame: \(why)"
        case .truncated(let missing): return "connection closed in the middle of a frame (\(missing) bytes missing)"
        }
    }
}

extension Frame {
    /// Encodes the frame, length prefix included, onto `out`.
    public func encode(into out: inout ByteBuffer) {
        encodeHead(into: &out)
        if var payload {
            out.writeBuffer(&payload)
            out.writeInteger(UInt8(ascii: "}"))
        }
    }

    /// Encodes all of the frame but its payload onto `out`: the length prefix (which counts the
    /// payload and the closing brace after it) and every field up to `"payload":`, or the whole
    /// frame when it has no payload. The sender then writes the payload as it is and `}`: a
    /// batch's bytes are not copied into the frame (`FrameWriter`).
    public func encodeHead(into out: inout ByteBuffer) {
        let lengthIndex = out.writerIndex
        out.writeInteger(UInt32(0))
        let start = out.writerIndex
        out.writeStaticString("{\"type\":")
        JSON.writeString(type.rawValue, into: &out)
        out.writeStaticString(",\"id\":")
        out.writeDecimal(id)
        if let version { out.writeStaticString(",\"version\":"); out.writeDecimal(version) }
        func field(_ name: StaticString, _ value: String?) {
            guard let value else { return }
            out.writeStaticString(name)
            JSON.writeString(value, into: &out)
        }
        field(",\"role\":", role)
        field(",\"instance\":", instance)
        field(",\"tenant\":", tenant)
        field(",\"destination\":", destination)
        field(",\"key\":", key)
        field(",\"reason\":", reason)
        field(",\"code\":", code)
        field(",\"message\":", message)
        field(",\"config\":", config)
        field(",\"topic\":", topic)
        if let headers {
            out.writeStaticString(",\"headers\":{")
            for (i, h) in headers.enumerated() {
                if i > 0 { out.writeInteger(UInt8(ascii: ",")) }
                JSON.writeString(h.name, into: &out)
                out.writeInteger(UInt8(ascii: ":"))
                JSON.writeString(h.value, into: &out)
            }
            out.writeInteger(UInt8(ascii: "}"))
        }
        if let parts {
            out.writeStaticString(",\"parts\":")
            Part.write(parts, into: &out)
        }
        if let retryable {
            if retryable { out.writeStaticString(",\"retryable\":true") } else { out.writeStaticString(",\"retryable\":false") }
        }
        if let payload {
            // Its length first: the receiver steps over the payload instead of scanning it.
            out.writeStaticString(",\"payload_bytes\":")
            out.writeDecimal(payload.readableBytes)
            out.writeStaticString(",\"payload\":")
            out.setInteger(UInt32(out.writerIndex - start + payload.readableBytes + 1), at: lengthIndex)
        } else {
            out.writeInteger(UInt8(ascii: "}"))
            out.setInteger(UInt32(out.writerIndex - start), at: lengthIndex)
        }
    }

    static let closingBrackets: [UInt8] = [UInt8(ascii: "}"), UInt8(ascii: "]")]

    /// Decodes one frame body (the JSON, without the length prefix).
    public static func decode(body: ByteBuffer) throws(FrameError) -> Frame {
        let result: Result<Frame, FrameError> = body.withUnsafeReadableBytes { raw in
            // Every member is validated except `payload`: a batch that one Sluice process hands to
            // another was validated where it entered (ingest) or written by the sender, and a process
            // that only forwards it does not parse it again. It is skipped by its structure.
            var members: [(key: String, range: Range<Int>)] = []
            var parts: [Part]?
            do {
                var scanner = JSONScanner(raw)
                var payloadBytes: Int?
                scanner.skipWhitespace()
                try scanner.readObject(depth: 0) { s, key in
                    let start = s.position
                    if key.is("payload") {
                        // Stepped over when the sender gave its length (and the length ends on the
                        // payload's last bracket); otherwise skipped by its structure.
                        if let n = payloadBytes, n > 0, s.skip(bytes: n, endingWith: Frame.closingBrackets) {
                        } else {
                            s.skipStructure()
                        }
                        guard s.position > start else { throw JSONError(offset: start, message: "expected the payload's value") }
                    } else if key.is("parts") {
                        // Read once, as it is validated (not skipped, then parsed again).
                        parts = try Frame.readParts(&s)
                    } else if key.is("payload_bytes") {
                        try s.skipValue(depth: 1)
                        payloadBytes = Int(String(decoding: s.bytes(start..<s.position), as: UTF8.self))
                    } else {
                        try s.skipValue(depth: 1)
                    }
                    members.append((key.string, start..<s.position))
                }
                try scanner.expectEnd()
            } catch let error as JSONError {
                return .failure(.invalidJSON(error))
            } catch let error as FrameError {
                return .failure(error)
            } catch {
                return .failure(.invalidFrame("\(error)"))
            }
            var type: FrameType?
            var id: UInt64?
            var frame = Frame(type: .error)
            for m in members {
                let value = UnsafeRawBufferPointer(rebasing: raw[m.range])
                func text() throws(FrameError) -> String {
                    guard let s = JSON.string(value) else { throw .invalidFrame("'\(m.key)' must be a string") }
                    return s
                }
                do {
                    switch m.key {
                    case "type":
                        let name = try text()
                        guard let t = FrameType(rawValue: name) else { throw FrameError.invalidFrame("unknown frame type '\(name)'") }
                        type = t
                    case "id":
                        guard JSON.kind(value) == .number, let v = UInt64(String(decoding: value, as: UTF8.self)) else {
                            throw FrameError.invalidFrame("'id' must be an unsigned integer")
                        }
                        id = v
                    case "version":
                        guard JSON.kind(value) == .number, let v = Int(String(decoding: value, as: UTF8.self)) else {
                            throw FrameError.invalidFrame("'version' must be an integer")
                        }
                        frame.version = v
                    case "role": frame.role = try text()
                    case "instance": frame.instance = try text()
                    case "tenant": frame.tenant = try text()
                    case "destination": frame.destination = try text()
                    case "key": frame.key = try text()
                    case "reason": frame.reason = try text()
                    case "code": frame.code = try text()
                    case "message": frame.message = try text()
                    case "config": frame.config = try text()
                    case "topic": frame.topic = try text()
                    case "retryable":
                        guard JSON.kind(value) == .bool else { throw FrameError.invalidFrame("'retryable' must be a boolean") }
                        frame.retryable = value.first == UInt8(ascii: "t")
                    case "payload":
                        frame.payload = body.slice(m.range)
                    case "parts":
                        frame.parts = parts
                    case "headers":
                        guard JSON.kind(value) == .object, let pairs = try? JSON.members(value) else {
                            throw FrameError.invalidFrame("'headers' must be an object of strings")
                        }
                        frame.headers = try pairs.map { pair in
                            guard let v = JSON.string(UnsafeRawBufferPointer(rebasing: value[pair.range])) else {
                                throw FrameError.invalidFrame("header '\(pair.key)' must be a string")
                            }
                            return Header(pair.key, v)
                        }
                    default:
                        continue  // newer peers may add fields
                    }
                } catch let e as FrameError {
                    return .failure(e)
                } catch {
                    return .failure(.invalidFrame("\(error)"))
                }
            }
            guard let type else { return .failure(.invalidFrame("missing 'type'")) }
            frame.type = type
            frame.id = id ?? 0
            return .success(frame)
        }
        return try result.get()
    }
}

extension Frame {
    /// The payload and parts of a several-message batch frame. The messages can be kept as
    /// slices of the payload (`slices`): one copy of their bytes, not two.
    public static func pack(_ messages: [(payload: ByteBuffer, topic: String?, eventID: String?)]) -> (ByteBuffer, [Part]) {
        var payload = ByteBuffer()
        payload.reserveCapacity(messages.reduce(2) { $0 + $1.payload.readableBytes + 1 })
        payload.writeInteger(UInt8(ascii: "["))
        var parts: [Part] = []
        parts.reserveCapacity(messages.count)
        for (i, m) in messages.enumerated() {
            if i > 0 { payload.writeInteger(UInt8(ascii: ",")) }
            payload.writeImmutableBuffer(m.payload)
            parts.append(Part(bytes: m.payload.readableBytes, topic: m.topic, eventID: m.eventID))
        }
        payload.writeInteger(UInt8(ascii: "]"))
        return (payload, parts)
    }

    /// Each part's bytes in a payload made by `pack`.
    public static func slices(of payload: ByteBuffer, _ parts: [Part]) -> [ByteBuffer] {
        var offset = payload.readerIndex + 1
        return parts.map { part in
            defer { offset += part.bytes + 1 }
            return payload.getSlice(at: offset, length: part.bytes)!
        }
    }

    /// One message of a batch frame (a struct, not a tuple: an array of tuples is copied and
    /// destroyed through the runtime's generic tuple witnesses, a per-event cost in kafka-out).
    public struct Message {
        public var payload: ByteBuffer
        public var part: Part?
    }

    /// The messages of a batch frame: its payload when it has no `parts`, else the payload's
    /// elements, cut by the parts' lengths (each checked to end where the array has a separator).
    public func messages() throws(FrameError) -> [Message] {
        guard let payload else { throw .invalidFrame("batch frame without payload") }
        guard let parts else { return [Message(payload: payload, part: nil)] }
        guard !parts.isEmpty else { throw .invalidFrame("'parts' is empty") }
        var out: [Message] = []
        out.reserveCapacity(parts.count)
        let count = payload.readableBytes
        let start = payload.readerIndex
        var offset = 1
        guard payload.getInteger(at: start, as: UInt8.self) == UInt8(ascii: "[") else {
            throw .invalidFrame("a payload with parts must be an array")
        }
        for (i, part) in parts.enumerated() {
            let separator = i == parts.count - 1 ? UInt8(ascii: "]") : UInt8(ascii: ",")
            guard part.bytes > 0, offset + part.bytes < count,
                payload.getInteger(at: start + offset + part.bytes, as: UInt8.self) == separator
            else { throw .invalidFrame("part \(i) (\(part.bytes) bytes) does not match the payload's elements") }
            out.append(Message(payload: payload.getSlice(at: start + offset, length: part.bytes)!, part: part))
            offset += part.bytes + 1
        }
        guard offset == count else { throw .invalidFrame("the payload has more than its parts") }
        return out
    }

    /// Reads `parts` (`[[bytes, topic or null, event id or null], …]`) at the scanner's position,
    /// validating as it goes. A loop of its own, not `readArray` with closures: a frame has a part
    /// per event, and kafka-out decodes every one (the closures and their generic machinery were
    /// half of a per-event frame's decoding).
    static func readParts(_ s: inout JSONScanner) throws(FrameError) -> [Part] {
        let invalid = FrameError.invalidFrame("'parts' must be an array of [bytes, topic or null, event id or null]")
        func expect(_ byte: UInt8, _ s: inout JSONScanner) throws(FrameError) {
            s.skipWhitespace()
            guard s.peek() == byte else { throw invalid }
            s.index += 1
            s.skipWhitespace()
        }
        func text(_ s: inout JSONScanner) throws(FrameError) -> String? {
            switch s.peek() {
            case UInt8(ascii: "\""):
                do { return try s.readString() } catch { throw invalid }
            case UInt8(ascii: "n"):
                do { try s.literal("null") } catch { throw invalid }
                return nil
            default: throw invalid
            }
        }
        /// A length: digits only, no leading zero.
        func count(_ s: inout JSONScanner) throws(FrameError) -> Int {
            let start = s.index
            var n = 0
            while let b = s.peek(), b &- UInt8(ascii: "0") < 10 {
                guard n < Int.max / 10 - 9 else { throw invalid }
                n = n * 10 + Int(b &- UInt8(ascii: "0"))
                s.index += 1
            }
            guard s.index > start, s.bytes[start] != UInt8(ascii: "0") || s.index == start + 1 else { throw invalid }
            return n
        }
        var parts: [Part] = []
        try expect(UInt8(ascii: "["), &s)
        if s.peek() == UInt8(ascii: "]") {
            s.index += 1
            return parts
        }
        while true {
            try expect(UInt8(ascii: "["), &s)
            let bytes = try count(&s)
            try expect(UInt8(ascii: ","), &s)
            let topic = try text(&s)
            try expect(UInt8(ascii: ","), &s)
            let eventID = try text(&s)
            s.skipWhitespace()
            guard s.peek() == UInt8(ascii: "]") else { throw invalid }
            s.index += 1
            parts.append(Part(bytes: bytes, topic: topic, eventID: eventID))
            s.skipWhitespace()
            switch s.peek() {
            case UInt8(ascii: ","): s.index += 1
            case UInt8(ascii: "]"):
                s.index += 1
                return parts
            default: throw invalid
            }
        }
    }
}

/// A message of a several-message batch frame that was not delivered.
public struct FailedPart: Sendable, Equatable {
    public var index: Int
    public var reason: String
    public var retryable: Bool
    public init(index: Int, reason: String, retryable: Bool) {
        self.index = index
        self.reason = reason
        self.retryable = retryable
    }
}

extension Frame {
    /// The answer to a batch frame with `parts` when some of its messages failed: the others were
    /// delivered. `reason` and `retryable` summarise (the first reason; retryable if all are).
    public static func nack(_ id: UInt64, failed: [FailedPart]) -> Frame {
        var frame = Frame.nack(id, reason: failed.first?.reason ?? "failed", retryable: failed.allSatisfy(\.retryable))
        frame.payload = JSONValue.object([
            .init(
                "failed",
                .array(
                    failed.map {
                        .object([
                            .init("index", .number(String($0.index))), .init("retryable", .bool($0.retryable)),
                            .init("reason", .string($0.reason)),
                        ])
                    }))
        ]).jsonBytes
        return frame
    }

    /// On a `nack` for a frame with parts: the messages that failed (the rest were delivered);
    /// nil when the nack is for the whole frame.
    public var failedParts: [FailedPart]? {
        guard type == .nack, let payload, let list = try? JSONValue.parse(payload)["failed"]?.arrayValue else { return nil }
        return list.compactMap { item in
            guard case .number(let n)? = item["index"], let index = Int(n) else { return nil }
            return FailedPart(index: index, reason: item["reason"]?.stringValue ?? "no reason given", retryable: item["retryable"] == .bool(true))
        }
    }
}
