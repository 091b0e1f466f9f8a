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
        // One validating pass; everything below finds its way by structure alone.
        try JSON.validate(raw, maxDepth: .max)
        let members = try JSON.members(raw, trusted: true)
        func value(_ range: Range<Int>) -> UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: raw[range]) }
        var changed = false

        // Events: supported types only, then the settings' filters, then per-event projections.
        var events: [Piece] = []
        var eventIDs: [String] = []
        var eventsMember: Int?
        if let i = members.firstIndex(where: { $0.key == "events" }), JSON.kind(value(members[i].range)) == .array {
            eventsMember = i
            let base = members[i].range.lowerBound
            for (position, r) in try JSON.elements(value(members[i].range), trusted: true).enumerated() {
                let range = (base + r.lowerBound)..<(base + r.upperBound)
                let event = value(range)
                let eventMembers = JSON.kind(event) == .object ? try JSON.members(event, trusted: true) : []
                let type = eventMembers.first { $0.key == "event_type" }.flatMap { JSON.string(value(shift($0.range, range))) } ?? ""
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
                var piece = Piece.bytes(range)
                if !includeLocation, let d = eventMembers.firstIndex(where: { $0.key == "data" }) {
                    let dataRange = shift(eventMembers[d].range, range)
                    if JSON.kind(value(dataRange)) == .object {
                        let dataMembers = try JSON.members(value(dataRange), trusted: true)
                        if dataMembers.contains(where: { $0.key == "location" }) {
                            // The event again, its data without `location`.
                            var data = ObjectWriter()
                            for m in dataMembers where m.key != "location" { data.member(m.key, .bytes(shift(m.range, dataRange))) }
                            var rewritten = ObjectWriter()
                            for (k, m) in eventMembers.enumerated() {
                                rewritten.member(m.key, k == d ? .object(data) : .bytes(shift(m.range, range)))
                            }
                            piece = .object(rewritten)
                            changed = true
                        }
                    }
                }
                events.append(piece)
                if !sendAsBatch {
                    // `data.source_message_id`, else the event's own, else its position in the batch.
                    var id: String?
                    if let d = eventMembers.first(where: { $0.key == "data" }), JSON.kind(value(shift(d.range, range))) == .object {
                        let dataRange = shift(d.range, range)
                        id = try JSON.members(value(dataRange), trusted: true).first { $0.key == "source_message_id" }
                            .flatMap { JSON.string(value(shift($0.range, dataRange))) }
                    }
                    id = id ?? eventMembers.first { $0.key == "source_message_id" }.flatMap { JSON.string(value(shift($0.range, range))) }
                    eventIDs.append(id ?? "index:\(position)")
                }
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
            members.first { $0.key == "timestamp_unixtime_ms" }.map { .bytes($0.range) } ?? .literal(String(receivedAt))
        var top: [(key: String, piece: Piece)] = []
        var eventsIndex: Int?
        for (i, m) in members.enumerated() {
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
