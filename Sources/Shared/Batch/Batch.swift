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
    static let eventIdFields: Set<String> = ["event_id", "session_id"]

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

    private func validateBytes(_ raw: UnsafeRawBufferPointer, buffer: ByteBuffer, label: String) throws(BatchError)
        -> ValidatedBatch
    {
        let members: [(key: String, range: Range<Int>)]
        do {
            members = try JSON.members(raw, maxDepth: maxDepth)
        } catch {
            throw BatchError("\(label) is not a JSON object: \(error)")
        }
        var environment: String?
        var mpid: String?
        var eventCount = 0
        for m in members {
            let value = UnsafeRawBufferPointer(rebasing: raw[m.range])
            let kind = JSON.kind(value)
            switch m.key {
            case "environment":
                guard let env = JSON.string(value), Self.environments.contains(env) else {
                    throw BatchError("\(label): \"environment\" must be \"production\", \"development\" or \"unknown\"")
                }
                environment = env
            case "mpid":
                if kind == .null { continue }
                guard let text = JSON.int64Text(value) else {
                    throw BatchError("\(label): \"mpid\" must be a signed 64-bit integer (a number or a string of digits)")
                }
                mpid = text
            case "batch_id":
                if kind != .null, JSON.int64Text(value) == nil {
                    throw BatchError("\(label): \"batch_id\" must be a signed 64-bit integer (a number or a string of digits)")
                }
            case "events":
                if kind == .null { continue }
                guard kind == .array else { throw BatchError("\(label): \"events\" must be an array") }
                eventCount = try validateEvents(value, label: label)
            case "user_identities":
                guard kind == .object || kind == .array || kind == .null else {
                    throw BatchError("\(label): \"user_identities\" must be an object or an array")
                }
            case "user_attributes", "device_info", "application_info", "source_info", "context", "consent_state":
                guard kind == .object || kind == .null else {
                    throw BatchError("\(label): \"\(m.key)\" must be an object")
                }
            default:
                continue
            }
        }
        guard environment != nil else {
            throw BatchError("\(label): required field \"environment\" is missing")
        }
        return ValidatedBatch(bytes: buffer, mpid: mpid, eventCount: eventCount)
    }

    private func validateEvents(_ raw: UnsafeRawBufferPointer, label: String) throws(BatchError) -> Int {
        let ranges = (try? JSON.elements(raw, maxDepth: .max)) ?? []
        for (i, range) in ranges.enumerated() {
            let event = UnsafeRawBufferPointer(rebasing: raw[range])
            let where_ = "\(label) events[\(i)]"
            guard JSON.kind(event) == .object, let members = try? JSON.members(event, maxDepth: .max) else {
                throw BatchError("\(where_) must be an object")
            }
            var type: String?
            var hasData = false
            for m in members {
                let value = UnsafeRawBufferPointer(rebasing: event[m.range])
                switch m.key {
                case "event_type":
                    guard let t = JSON.string(value) else { throw BatchError("\(where_): \"event_type\" must be a string") }
                    type = t
                case "data":
                    guard JSON.kind(value) == .object else { throw BatchError("\(where_): \"data\" must be an object") }
                    hasData = true
                    try validateEventData(value, label: where_)
                default:
                    continue
                }
            }
            guard let type, !type.isEmpty else {
                throw BatchError("\(where_): required event field \"event_type\" is missing or empty")
            }
            guard EventType(rawValue: type) != nil else {
                throw BatchError("\(where_): unknown event_type \"\(type)\"")
            }
            guard hasData else { throw BatchError("\(where_): required event field \"data\" is missing") }
        }
        return ranges.count
    }

    private func validateEventData(_ raw: UnsafeRawBufferPointer, label: String) throws(BatchError) {
        let members = (try? JSON.members(raw, maxDepth: .max)) ?? []
        for m in members where Self.eventIdFields.contains(m.key) {
            let value = UnsafeRawBufferPointer(rebasing: raw[m.range])
            if JSON.kind(value) != .null, JSON.int64Text(value) == nil {
                throw BatchError("\(label): \"data.\(m.key)\" must be a signed 64-bit integer (a number or a string of digits)")
            }
        }
    }
}
