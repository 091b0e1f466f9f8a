import NIOCore

@testable import Shared

/// The batch validator as it was before the one-pass rewrite: every value validated by `JSON.members`
/// / `JSON.elements` at each level (several passes). Kept only as the reference the differential
/// test compares the one-pass validator with.
struct ReferenceBatchValidator {
    var maxDepth = JSONScanner.defaultMaxDepth
    static let environments = BatchValidator.environments
    static let eventIdFields: Set<String> = ["event_id", "session_id"]

    func validate(_ buffer: ByteBuffer, label: String = "batch") throws(BatchError) -> ValidatedBatch {
        let result: Result<ValidatedBatch, BatchError> = buffer.withBytes { raw in
            do throws(BatchError) {
                return .success(try validateBytes(raw, buffer: buffer, label: label))
            } catch {
                return .failure(error)
            }
        }
        return try result.get()
    }

    func validateBytes(_ raw: UnsafeRawBufferPointer, buffer: ByteBuffer, label: String) throws(BatchError)
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

    func validateEvents(_ raw: UnsafeRawBufferPointer, label: String) throws(BatchError) -> Int {
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

    func validateEventData(_ raw: UnsafeRawBufferPointer, label: String) throws(BatchError) {
        let members = (try? JSON.members(raw, maxDepth: .max)) ?? []
        for m in members where Self.eventIdFields.contains(m.key) {
            let value = UnsafeRawBufferPointer(rebasing: raw[m.range])
            if JSON.kind(value) != .null, JSON.int64Text(value) == nil {
                throw BatchError("\(label): \"data.\(m.key)\" must be a signed 64-bit integer (a number or a string of digits)")
            }
        }
    }
}
