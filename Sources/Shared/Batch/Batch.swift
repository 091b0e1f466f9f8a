import NIOCore

/// mParticle's event types (Events API `event_type`), each with its name in the JSON.
public enum EventType: String, Sendable, CaseIterable {
    case sessionStart = "session_start"
    case sessionEnd = "session_end"
    case screenView = "screen_view"
    case customEvent = "custom_event"
    case crashReport = "crash_report"
    case optOut = "opt_out"
    case firstRun = "first_run"
    case pushRegistration = "push_registration"
    case applicationStateTransition = "application_state_transition"
    case pushMessage = "push_message"
    case networkPerformance = "network_performance"
    case breadcrumb = "breadcrumb"
    case profile = "profile"
    case commerceEvent = "commerce_event"
    case userAttributeChange = "user_attribute_change"
    case userIdentityChange = "user_identity_change"
    case uninstall = "uninstall"

    /// The type a JSON string value (its bytes, with the quotes) names; nil for anything else.
    /// Matched on the bytes (a length check, then a memcmp per candidate): it runs for every event
    /// of every batch, in ingest's validation and the router's splice.
    public init?(json value: UnsafeRawBufferPointer) {
        guard value.count >= 2, value.first == UInt8(ascii: "\""), value.last == UInt8(ascii: "\"") else { return nil }
        let body = UnsafeRawBufferPointer(rebasing: value.dropFirst().dropLast())
        guard !body.contains(UInt8(ascii: "\\")) else {
            guard let name = JSON.string(value), let type = EventType(rawValue: name) else { return nil }
            self = type
            return
        }
        let key = JSONKey(raw: body, escaped: false)
        // The most common types first.
        if key.is("custom_event") { self = .customEvent }
        else if key.is("screen_view") { self = .screenView }
        else if key.is("commerce_event") { self = .commerceEvent }
        else if key.is("session_start") { self = .sessionStart }
        else if key.is("session_end") { self = .sessionEnd }
        else if key.is("breadcrumb") { self = .breadcrumb }
        else if key.is("application_state_transition") { self = .applicationStateTransition }
        else if key.is("crash_report") { self = .crashReport }
        else if key.is("opt_out") { self = .optOut }
        else if key.is("first_run") { self = .firstRun }
        else if key.is("push_registration") { self = .pushRegistration }
        else if key.is("push_message") { self = .pushMessage }
        else if key.is("network_performance") { self = .networkPerformance }
        else if key.is("profile") { self = .profile }
        else if key.is("user_attribute_change") { self = .userAttributeChange }
        else if key.is("user_identity_change") { self = .userIdentityChange }
        else if key.is("uninstall") { self = .uninstall }
        else { return nil }
    }
}

/// A batch that passed validation: its bytes exactly as received, and what routing needs from it.
public struct ValidatedBatch: Sendable {
    public var bytes: ByteBuffer
    /// The MPID as canonical decimal text (the Kafka partition key); nil when the batch has none.
    public var mpid: String?
    public var eventCount: Int

    public init(bytes: ByteBuffer, mpid: String?, eventCount: Int) {
        self.bytes = bytes
        self.mpid = mpid
        self.eventCount = eventCount
    }
}

/// Why a batch was refused. `message` names the field and what is wrong with it.
public struct BatchError: Error, Equatable, CustomStringConvertible, Sendable {
    public var message: String
    /// The batch is over the size limit (HTTP 413) rather than invalid (HTTP 400).
    public var isTooLarge: Bool
    public init(_ message: String, isTooLarge: Bool = false) {
        self.message = message
        self.isTooLarge = isTooLarge
    }
    public var description: String { message }
}

/// Validation of mParticle batches (Events API shape), by scanning bytes: no tree is built.
public struct BatchValidator: Sendable {
    public var maxBatchBytes: Int
    public var maxDepth: Int

    public static let environments: Set<String> = ["production", "development", "unknown"]
    /// Fields holding signed 64-bit ids: numbers or decimal strings, kept exact.
    static let batchIdFields: Set<String> = ["mpid", "batch_id"]

    public init(maxBatchBytes: Int = 128 * 1024, maxDepth: Int = JSONScanner.defaultMaxDepth) {
        self.maxBatchBytes = maxBatchBytes
        self.maxDepth = maxDepth
    }

    /// Validates one batch (`POST /v2/events`).
    public func validate(_ buffer: ByteBuffer) throws(BatchError) -> ValidatedBatch {
        try validate(buffer, label: "batch")
    }

    /// Validates a bulk request (`POST /v2/bulkevents`): a JSON array of batches.
    public func validateBulk(_ buffer: ByteBuffer, maxBatches: Int) throws(BatchError) -> [ValidatedBatch] {
        let ranges: [Range<Int>]
        let scanned: Result<[Range<Int>], JSONError> = buffer.withBytes { raw in
            do throws(JSONError) { return .success(try JSON.elements(raw, maxDepth: maxDepth)) } catch { return .failure(error) }
        }
        switch scanned {
        case .success(let r): ranges = r
        case .failure(let error): throw BatchError("request body is not a JSON array of batches: \(error)")
        }
        guard !ranges.isEmpty else { throw BatchError("the bulk request holds no batches") }
        guard ranges.count <= maxBatches else {
            throw BatchError("the bulk request holds \(ranges.count) batches; at most \(maxBatches) are allowed")
        }
        var out: [ValidatedBatch] = []
        out.reserveCapacity(ranges.count)
        for (i, range) in ranges.enumerated() {
            out.append(try validate(buffer.slice(range), label: "batch [\(i)]"))
        }
        return out
    }

    func validate(_ buffer: ByteBuffer, label: String) throws(BatchError) -> ValidatedBatch {
        guard buffer.readableBytes <= maxBatchBytes else {
            throw BatchError("\(label) is \(buffer.readableBytes) bytes; the limit is \(maxBatchBytes) bytes", isTooLarge: true)
        }
        let result: Result<ValidatedBatch, BatchError> = buffer.withBytes { raw in
            do throws(BatchError) {
                return .success(try validateBytes(raw, buffer: buffer, label: label))
            } catch {
                return .failure(error)
            }
        }
        return try result.get()
    }

    /// One pass over the batch: the grammar, UTF-8 and depth are checked as the fields are read.
    /// A syntax error anywhere wins over a field problem found before it (the first field problem
    /// is kept until the end of the document).
    private func validateBytes(_ raw: UnsafeRawBufferPointer, buffer: ByteBuffer, label: String) throws(BatchError)
        -> ValidatedBatch
    {
        var scanner = JSONScanner(raw, maxDepth: maxDepth)
        var problem: BatchError?
        var environment: String?
        var mpid: String?
        var eventCount = 0
        do {
            scanner.skipWhitespace()
            try scanner.readObject(depth: 0) { s, key in
                if key.is("events") && s.peek() == UInt8(ascii: "[") {
                    eventCount = try s.readArray(depth: 1) { s, i in
                        try Self.readEvent(&s, depth: 2, index: i, label: label, problem: &problem)
                    }
                    return
                }
                let start = s.position
                try s.skipValue(depth: 1)
                guard problem == nil else { return }
                let value = s.bytes(start..<s.position)
                let kind = JSON.kind(value)
                if key.is("environment") {
                    if let env = JSON.string(value), Self.environments.contains(env) {
                        environment = env
                    } else {
                        problem = BatchError("\(label): \"environment\" must be \"production\", \"development\" or \"unknown\"")
                    }
                } else if key.is("mpid") {
                    guard kind != .null else { return }
                    if let text = JSON.int64Text(value) {
                        mpid = text
                    } else {
                        problem = BatchError("\(label): \"mpid\" must be a signed 64-bit integer (a number or a string of digits)")
                    }
                } else if key.is("batch_id") {
                    if kind != .null, !JSON.isInt64(value) {
                        problem = BatchError("\(label): \"batch_id\" must be a signed 64-bit integer (a number or a string of digits)")
                    }
                } else if key.is("events") {
                    if kind != .null { problem = BatchError("\(label): \"events\" must be an array") }
                } else if key.is("user_identities") {
                    if kind != .object && kind != .array && kind != .null {
                        problem = BatchError("\(label): \"user_identities\" must be an object or an array")
                    }
                } else if key.is("user_attributes") || key.is("device_info") || key.is("application_info")
                    || key.is("source_info") || key.is("context") || key.is("consent_state")
                {
                    if kind != .object && kind != .null { problem = BatchError("\(label): \"\(key.string)\" must be an object") }
                }
            }
            try scanner.expectEnd()
        } catch let error as JSONError {
            throw BatchError("\(label) is not a JSON object: \(error)")
        } catch {
            throw BatchError("\(label) is not a JSON object: \(error)")
        }
        if let problem { throw problem }
        guard environment != nil else {
            throw BatchError("\(label): required field \"environment\" is missing")
        }
        return ValidatedBatch(bytes: buffer, mpid: mpid, eventCount: eventCount)
    }

    /// One element of `events`: an object with a known `event_type` and a `data` object whose ids
    /// are signed 64-bit integers. Records the first problem; throws only for syntax errors.
    private static func readEvent(
        _ s: inout JSONScanner, depth: Int, index: Int, label: String, problem: inout BatchError?
    ) throws {
        func place() -> String { "\(label) events[\(index)]" }
        guard s.peek() == UInt8(ascii: "{") else {
            try s.skipValue(depth: depth)
            if problem == nil { problem = BatchError("\(place()) must be an object") }
            return
        }
        var type: EventType?
        var typeText: UnsafeRawBufferPointer?
        var hasData = false
        try s.readObject(depth: depth) { s, key in
            if key.is("data") && s.peek() == UInt8(ascii: "{") {
                hasData = true
                try s.readObject(depth: depth + 1) { s, key in
                    let start = s.position
                    try s.skipValue(depth: depth + 2)
                    guard problem == nil, key.is("event_id") || key.is("session_id") else { return }
                    let value = s.bytes(start..<s.position)
                    if JSON.kind(value) != .null, !JSON.isInt64(value) {
                        problem = BatchError(
                            "\(place()): \"data.\(key.string)\" must be a signed 64-bit integer (a number or a string of digits)")
                    }
                }
                return
            }
            let start = s.position
            try s.skipValue(depth: depth + 1)
            if key.is("event_type") {
                let value = s.bytes(start..<s.position)
                if JSON.kind(value) == .string {
                    typeText = value
                    type = EventType(json: value)
                } else if problem == nil {
                    problem = BatchError("\(place()): \"event_type\" must be a string")
                }
            } else if key.is("data") {
                hasData = true
                if problem == nil { problem = BatchError("\(place()): \"data\" must be an object") }
            }
        }
        guard problem == nil else { return }
        guard type != nil else {
            let name = typeText.flatMap(JSON.string) ?? ""
            problem =
                name.isEmpty
                ? BatchError("\(place()): required event field \"event_type\" is missing or empty")
                : BatchError("\(place()): unknown event_type \"\(name)\"")
            return
        }
        if !hasData { problem = BatchError("\(place()): required event field \"data\" is missing") }
    }
}
