import NIOCore

/// The Kafka integration's connection settings (seed 000, "Connection Settings"), with its defaults.
public struct KafkaConnectionSettings: Sendable, Equatable {
    public enum MetadataField: String, Sendable, CaseIterable {
        /// Device Name → `device_info.device`.
        case deviceName = "device_name"
        /// IP Address → `ip`.
        case ipAddress = "ip_address"
    }

    /// Forwarded with each batch as `unique_id`.
    public var uniqueID: String?
    public var sendNetworkPerformanceEvents = true
    /// true: one Kafka message per batch; false: one message per event, each a batch holding that event.
    public var sendAsBatch = true
    /// Event `data.location`.
    public var includeLocation = true
    /// `profile` events (deprecated upstream; the switch is kept).
    public var sendProfileChangeEvents = true
    /// `application_info`, `device_info`, `source_info`.
    public var includeMetadata = true
    public var includeUserAttributeChangeEvents = false
    public var includeUserIdentityChangeEvents = false
    /// Whether a batch with no events (after filtering) is sent.
    public var sendBatchesWithoutEvents = true
    /// `mp_deviceid`.
    public var includeMPDeviceID = false
    /// `context.location`.
    public var includeEventBatchLocation = false
    public var metadataFieldExclusion: Set<MetadataField> = []

    public init() {}

    /// The event types the Kafka integration forwards (seed 000, "Supported events").
    public static let supportedEventTypes: Set<String> = [
        "custom_event", "application_state_transition", "breadcrumb", "commerce_event", "crash_report", "first_run",
        "network_performance", "opt_out", "profile", "push_message", "push_registration", "screen_view",
        "session_start", "session_end", "uninstall", "user_attribute_change", "user_identity_change",
    ]

    /// Whether an event of this type is forwarded under these settings.
    public func forwards(eventType: String) -> Bool {
        guard Self.supportedEventTypes.contains(eventType) else { return false }
        return EventType(rawValue: eventType).map(forwards) ?? true
    }

    /// Whether the integration forwards this type at all (`supportedEventTypes`).
    static func supports(_ type: EventType) -> Bool { supportsAll || supportedTypes.contains(type) }
    private static let supportedTypes = Set(EventType.allCases.filter { supportedEventTypes.contains($0.rawValue) })
    /// Every type `EventType` knows is supported (true today): no hashing per event then.
    private static let supportsAll = supportedTypes.count == EventType.allCases.count

    /// Whether these settings forward a supported type (the switches for the optional ones).
    func forwards(_ type: EventType) -> Bool {
        switch type {
        case .networkPerformance: return sendNetworkPerformanceEvents
        case .profile: return sendProfileChangeEvents
        case .userAttributeChange: return includeUserAttributeChangeEvents
        case .userIdentityChange: return includeUserIdentityChangeEvents
        default: return true
        }
    }
}

/// What applying the settings to one batch produced.
public struct KafkaBatchOutput: Sendable {
    /// The Kafka message payloads, in order (empty when nothing is to be sent).
    public var messages: [ByteBuffer]
    /// For one message per event: each message's event id (its `source_message_id`, or
    /// `index:N` for the event's position in the batch). Empty for one message per batch.
    public var eventIDs: [String] = []
    /// For one message per event, from `splice`: the messages as one JSON array (`[m1,m2,…]`),
    /// each message a slice of it — a frame's packed payload for all of them, as `Frame.pack`
    /// would make it, without copying them again.
    public var packed: ByteBuffer?
    /// Events dropped because their type is not one the integration forwards.
    public var unsupportedEvents = 0
    /// Events dropped by the settings (network performance, profile, attribute/identity change).
    public var filteredEvents = 0
}

extension KafkaConnectionSettings {
    /// Applies the settings to a validated batch and produces the Kafka messages in mParticle's
    /// outgoing format. `receivedAt` (Unix ms) stamps user identities when the batch has no timestamp.
    public func apply(to batch: JSONValue, original: ByteBuffer, receivedAt: Int64) -> KafkaBatchOutput {
        guard case .object(var members) = batch else { return KafkaBatchOutput(messages: [original]) }
        var changed = false
        var output = KafkaBatchOutput(messages: [])
        func remove(_ key: String) {
            let before = members.count
            members.removeAll { $0.key == key }
            if members.count != before { changed = true }
        }
        func edit(_ key: String, _ body: (inout JSONValue) -> Bool) {
            guard let i = members.firstIndex(where: { $0.key == key }) else { return }
            if body(&members[i].value) { changed = true }
        }

        // Events: supported types only, then the settings' filters, then per-event projections.
        var events: [JSONValue] = []
        var positions: [Int] = []
        if let i = members.firstIndex(where: { $0.key == "events" }), case .array(let all) = members[i].value {
            for (position, var event) in all.enumerated() {
                let type = event["event_type"]?.stringValue ?? ""
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
                if !includeLocation, var data = event["data"], data["location"] != nil {
                    data["location"] = nil
                    event["data"] = data
                    changed = true
                }
                events.append(event)
                positions.append(position)
            }
            members[i].value = .array(events)
        }
        if events.isEmpty && !sendBatchesWithoutEvents { return output }

        if !includeMetadata {
            remove("application_info")
            remove("device_info")
            remove("source_info")
        }
        if metadataFieldExclusion.contains(.deviceName) {
            edit("device_info") { info in
                guard info["device"] != nil else { return false }
                info["device"] = nil
                return true
            }
        }
        if metadataFieldExclusion.contains(.ipAddress) { remove("ip") }
        if !includeMPDeviceID { remove("mp_deviceid") }
        if !includeEventBatchLocation {
            edit("context") { context in
                guard context["location"] != nil else { return false }
                context["location"] = nil
                return true
            }
        }
        let timestamp = members.first { $0.key == "timestamp_unixtime_ms" }?.value ?? .number(String(receivedAt))
        edit("user_identities") { identities in
            guard case .object(let map) = identities else { return false }
            identities = .array(
                map.map { m in
                    .object([
                        .init("identity_type", .string(m.key)), .init("identity", m.value),
                        .init("timestamp_unixtime_ms", timestamp),
                    ])
                })
            return true
        }
        if let uniqueID {
            remove("unique_id")
            members.append(.init("unique_id", .string(uniqueID)))
            changed = true
        }

        if sendAsBatch || events.isEmpty {
            output.messages = [changed ? JSONValue.object(members).jsonBytes : original]
        } else {
            output.messages = events.map { event in
                JSONValue.object(members.map { $0.key == "events" ? .init("events", .array([event])) : $0 }).jsonBytes
            }
            output.eventIDs = zip(events, positions).map { event, position in
                event["data"]?["source_message_id"]?.stringValue ?? event["source_message_id"]?.stringValue ?? "index:\(position)"
            }
        }
        return output
    }
}
