import NIOCore

/// The connection settings applied by splicing bytes: the output is cut from the batch's own
/// bytes, with small inserts (a converted `user_identities`, `unique_id`) — no tree of Swift
/// values is built and nothing untouched is re-serialised. Same result as `apply` (the tree-based
/// reference implementation, kept for the property tests), at a fraction of the cost.
extension KafkaConnectionSettings {
    public func splice(_ batch: ByteBuffer, receivedAt: Int64) throws(JSONError) -> KafkaBatchOutput {
        let result: Result<KafkaBatchOutput, JSONError> = batch.withUnsafeReadableBytes { raw in
            do throws(JSONError) { return .success(try splice(raw, original: batch, receivedAt: receivedAt)) } catch {
                return .failure(error)
            }
        }
        return try result.get()
    }

    private func splice(_ raw: UnsafeRawBufferPointer, original: ByteBuffer, receivedAt: Int64) throws(JSONError)
        -> KafkaBatchOutput
    {
        var output = KafkaBatchOutput(messages: [])
        guard JSON.kind(raw) == .object else { return KafkaBatchOutput(messages: [original]) }
        let outline = try BatchOutline(raw)
        let members = outline.members
        func value(_ range: Range<Int>) -> UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: raw[range]) }
        var changed = false

        // Events: supported types only, then the settings' filters, then per-event projections.
        var events: [Piece] = []
        var eventIDs: [String] = []
        let eventsMember = outline.eventsMember
        for (position, event) in outline.events.enumerated() {
            let type = event.members.first { $0.key.is("event_type") }.flatMap { JSON.string(value($0.range)) } ?? ""
            guard Self.supportedEventTypes.contains(type) else {
                output.unsupportedEvents += 1
                changed = true
                continue
            }
            guard forwards(eventType: type) else {
                output.filteredEvents += 1
                changed = true
                continue
            }
            var piece = Piece.bytes(event.range)
            if !includeLocation, let data = event.data, data.contains(where: { $0.key.is("location") }) {
                // The event again, its data without `location`.
                var rewritten = ObjectWriter()
                for (k, m) in event.members.enumerated() {
                    if k == event.dataIndex {
                        var object = ObjectWriter()
                        for d in data where !d.key.is("location") { object.member(d.key.string, .bytes(d.range)) }
                        rewritten.member(m.key.string, .object(object))
                    } else {
                        rewritten.member(m.key.string, .bytes(m.range))
                    }
                }
                piece = .object(rewritten)
                changed = true
            }
            events.append(piece)
            if !sendAsBatch {
                // `data.source_message_id`, else the event's own, else its position in the batch.
                var id = event.data?.first { $0.key.is("source_message_id") }.flatMap { JSON.string(value($0.range)) }
                id = id ?? event.members.first { $0.key.is("source_message_id") }.flatMap { JSON.string(value($0.range)) }
                eventIDs.append(id ?? "index:\(position)")
            }
        }
        if events.isEmpty && !sendBatchesWithoutEvents { return output }

        // The top level, member by member: kept as is, dropped, or replaced.
        var dropped: Set<String> = []
        if !includeMetadata { dropped.formUnion(["application_info", "device_info", "source_info"]) }
        if metadataFieldExclusion.contains(.ipAddress) { dropped.insert("ip") }
        if !includeMPDeviceID { dropped.insert("mp_deviceid") }
        if uniqueID != nil { dropped.insert("unique_id") }
        let timestamp: Piece =
            members.first { $0.key.is("timestamp_unixtime_ms") }.map { .bytes($0.range) } ?? .literal(String(receivedAt))
        var top: [(key: String, piece: Piece)] = []
        var eventsIndex: Int?
        for (i, outlined) in members.enumerated() {
            let m = (key: outlined.key.string, range: outlined.range)
            if dropped.contains(m.key) {
                changed = true
                continue
            }
            switch m.key {
            case "events" where i == eventsMember:
                eventsIndex = top.count
                top.append((m.key, .bytes(m.range)))  // replaced below
            case "device_info" where metadataFieldExclusion.contains(.deviceName):
                top.append((m.key, try without("device", in: m.range, raw: raw, changed: &changed)))
            case "context" where !includeEventBatchLocation:
                top.append((m.key, try without("location", in: m.range, raw: raw, changed: &changed)))
            case "user_identities" where JSON.kind(value(m.range)) == .object:
                // mParticle's outgoing form: a list of {identity_type, identity, timestamp_unixtime_ms}.
                var list = ArrayWriter()
                for identity in try JSON.members(value(m.range), trusted: true) {
                    var item = ObjectWriter()
                    item.member("identity_type", .string(identity.key))
                    item.member("identity", .bytes(shift(identity.range, m.range)))
                    item.member("timestamp_unixtime_ms", timestamp)
                    list.element(.object(item))
                }
                top.append((m.key, .array(list)))
                changed = true
            default:
                top.append((m.key, .bytes(m.range)))
            }
        }
        if let uniqueID {
            top.append(("unique_id", .string(uniqueID)))
            changed = true
        }

        if sendAsBatch || events.isEmpty {
            guard changed else {
                output.messages = [original]
                return output
            }
            if let eventsIndex { top[eventsIndex].piece = .array(ArrayWriter(events)) }
            var out = ByteBuffer()
            out.reserveCapacity(raw.count + 256)
            ObjectWriter(top).write(raw, into: &out)
            output.messages = [out]
        } else {
            // One message per event: the top level around each event, written once.
            var before = ByteBuffer()
            var after = ByteBuffer()
            ObjectWriter(Array(top[..<eventsIndex!])).writeOpen(raw, into: &before, moreFollows: true)
            JSON.writeString("events", into: &before)
            before.writeStaticString(":[")
            after.writeStaticString("]")
            ObjectWriter(Array(top[(eventsIndex! + 1)...])).writeClose(raw, into: &after)
            output.messages = events.map { event in
                var out = ByteBuffer()
                out.reserveCapacity(before.readableBytes + after.readableBytes + 512)
                out.writeImmutableBuffer(before)
                event.write(raw, into: &out)
                out.writeImmutableBuffer(after)
                return out
            }
            output.eventIDs = eventIDs
        }
        return output
    }

    /// An object member's value without one of its own members (or unchanged).
    private func without(_ key: String, in range: Range<Int>, raw: UnsafeRawBufferPointer, changed: inout Bool) throws(JSONError)
        -> Piece
    {
        let object = UnsafeRawBufferPointer(rebasing: raw[range])
        guard JSON.kind(object) == .object else { return .bytes(range) }
        let members = try JSON.members(object, trusted: true)
        guard members.contains(where: { $0.key == key }) else { return .bytes(range) }
        changed = true
        var writer = ObjectWriter()
        for m in members where m.key != key { writer.member(m.key, .bytes(shift(m.range, range))) }
        return .object(writer)
    }
}

/// A range relative to `base`'s start, made absolute.
@inline(__always)
private func shift(_ r: Range<Int>, _ base: Range<Int>) -> Range<Int> { (base.lowerBound + r.lowerBound)..<(base.lowerBound + r.upperBound) }

/// A piece of output: bytes of the input, or something written.
private indirect enum Piece {
    case bytes(Range<Int>)
    case literal(String)
    case string(String)
    case object(ObjectWriter)
    case array(ArrayWriter)

    func write(_ raw: UnsafeRawBufferPointer, into out: inout ByteBuffer) {
        switch self {
        case .bytes(let r): out.writeBytes(UnsafeRawBufferPointer(rebasing: raw[r]))
        case .literal(let s): out.writeString(s)
        case .string(let s): JSON.writeString(s, into: &out)
        case .object(let o): o.write(raw, into: &out)
        case .array(let a): a.write(raw, into: &out)
        }
    }
}

private struct ObjectWriter {
    var members: [(key: String, piece: Piece)] = []
    init() {}
    init(_ members: [(key: String, piece: Piece)]) { self.members = members }
    mutating func member(_ key: String, _ piece: Piece) { members.append((key, piece)) }

    func write(_ raw: UnsafeRawBufferPointer, into out: inout ByteBuffer) {
        writeOpen(raw, into: &out, moreFollows: false)
        out.writeStaticString("}")
    }

    /// `{` and the members; with `moreFollows`, a trailing comma when there were any.
    func writeOpen(_ raw: UnsafeRawBufferPointer, into out: inout ByteBuffer, moreFollows: Bool) {
        out.writeStaticString("{")
        for (i, m) in members.enumerated() {
            if i > 0 { out.writeStaticString(",") }
            JSON.writeString(m.key, into: &out)
            out.writeStaticString(":")
            m.piece.write(raw, into: &out)
        }
        if moreFollows && !members.isEmpty { out.writeStaticString(",") }
    }

    /// The members after another one, then `}`.
    func writeClose(_ raw: UnsafeRawBufferPointer, into out: inout ByteBuffer) {
        for m in members {
            out.writeStaticString(",")
            JSON.writeString(m.key, into: &out)
            out.writeStaticString(":")
            m.piece.write(raw, into: &out)
        }
        out.writeStaticString("}")
    }
}

private struct ArrayWriter {
    var elements: [Piece] = []
    init() {}
    init(_ elements: [Piece]) { self.elements = elements }
    mutating func element(_ piece: Piece) { elements.append(piece) }

    func write(_ raw: UnsafeRawBufferPointer, into out: inout ByteBuffer) {
        out.writeStaticString("[")
        for (i, e) in elements.enumerated() {
            if i > 0 { out.writeStaticString(",") }
            e.write(raw, into: &out)
        }
        out.writeStaticString("]")
    }
}

/// What splicing needs of a batch, read in one validating pass: the top-level members (ranges
/// absolute in the batch) and, when `events` is an array, each event's members and the members of
/// its first `data` member when that is an object. Keys stay as bytes of the batch.
private struct BatchOutline {
    struct Member {
        var key: JSONKey
        var range: Range<Int>
    }
    struct Event {
        var range: Range<Int>
        /// Empty when the event is not an object.
        var members: [Member] = []
        /// Index in `members` of the first `data` member, and its members when it is an object.
        var dataIndex: Int?
        var data: [Member]?
    }

    var members: [Member] = []
    /// Index in `members` of the first `events` member, when it is an array (then `events` lists it).
    var eventsMember: Int?
    var events: [Event] = []

    init(_ raw: UnsafeRawBufferPointer) throws(JSONError) {
        var scanner = JSONScanner(raw, maxDepth: .max)
        var members: [Member] = []
        var eventsMember: Int?
        var seenEvents = false
        var events: [Event] = []
        do {
            scanner.skipWhitespace()
            try scanner.readObject(depth: 0) { s, key in
                let start = s.position
                if !seenEvents && key.is("events") {
                    seenEvents = true
                    guard s.peek() == UInt8(ascii: "[") else {
                        try s.skipValue(depth: 1)
                        members.append(Member(key: key, range: start..<s.position))
                        return
                    }
                    eventsMember = members.count
                    try s.readArray(depth: 1) { s, _ in events.append(try BatchOutline.event(&s)) }
                } else {
                    try s.skipValue(depth: 1)
                }
                members.append(Member(key: key, range: start..<s.position))
            }
            try scanner.expectEnd()
        } catch let error as JSONError {
            throw error
        } catch {
            throw JSONError(offset: scanner.position, message: "\(error)")
        }
        self.members = members
        self.eventsMember = eventsMember
        self.events = events
    }

    private static func event(_ s: inout JSONScanner) throws -> Event {
        let start = s.position
        guard s.peek() == UInt8(ascii: "{") else {
            try s.skipValue(depth: 2)
            return Event(range: start..<s.position)
        }
        var event = Event(range: start..<start)
        try s.readObject(depth: 2) { s, key in
            let valueStart = s.position
            if event.dataIndex == nil, key.is("data") {
                event.dataIndex = event.members.count
                if s.peek() == UInt8(ascii: "{") {
                    var data: [Member] = []
                    try s.readObject(depth: 3) { s, key in
                        let dataStart = s.position
                        try s.skipValue(depth: 4)
                        data.append(Member(key: key, range: dataStart..<s.position))
                    }
                    event.data = data
                } else {
                    try s.skipValue(depth: 3)
                }
            } else {
                try s.skipValue(depth: 3)
            }
            event.members.append(Member(key: key, range: valueStart..<s.position))
        }
        event.range = start..<s.position
        return event
    }
}
