import Foundation

/// A tenant's Keen destination (seed 004: Keen's Kafka Inbound Cluster, or Keen's HTTP API).
public struct KeenDestination: Sendable, Equatable {
    public enum Transport: String, Sendable {
        case kafka
        case http
    }

    public static let defaultBootstrapServers = "b1.kafka-in.keen.io:9092,b2.kafka-in.keen.io:9092,b3.kafka-in.keen.io:9092"
    public static let defaultHTTPBaseURL = "https://api.keen.io"

    public var projectID: String
    /// A write key, the master key, or an access key with writes enabled.
    public var key: Secret
    /// The collection: fixed, or a template where `{event_type}` is replaced by each event's type.
    public var collection: String
    public var transport: Transport
    public var bootstrapServers: String
    public var httpBaseURL: String
    /// CA certificate(s) to trust instead of the system store (for tests and private endpoints).
    public var sslCAPEM: String?
    /// Send `keen.uniqueness_token` so that retries and replays are not counted twice.
    public var uniquenessToken: Bool
    /// Which batch context goes with each event.
    public var includeUser: Bool
    public var includeDevice: Bool
    public var includeApplication: Bool

    public init(
        projectID: String, key: Secret, collection: String, transport: Transport = .kafka,
        bootstrapServers: String = KeenDestination.defaultBootstrapServers,
        httpBaseURL: String = KeenDestination.defaultHTTPBaseURL, sslCAPEM: String? = nil, uniquenessToken: Bool = true,
        includeUser: Bool = true, includeDevice: Bool = true, includeApplication: Bool = true
    ) {
        self.projectID = projectID
        self.key = key
        self.collection = collection
        self.transport = transport
        self.bootstrapServers = bootstrapServers
        self.httpBaseURL = httpBaseURL
        self.sslCAPEM = sslCAPEM
        self.uniquenessToken = uniquenessToken
        self.includeUser = includeUser
        self.includeDevice = includeDevice
        self.includeApplication = includeApplication
    }

    public static let eventTypePlaceholder = "{event_type}"

    /// The collection for an event of this type.
    public func collection(eventType: String) -> String {
        collection.replacingOccurrences(of: Self.eventTypePlaceholder, with: eventType)
    }

    public var isDerivedCollection: Bool { collection.contains(Self.eventTypePlaceholder) }

    /// Why Keen would refuse this collection name (nil: it is fine). The Kafka Inbound Cluster's
    /// rule (seed 004: topic = collection, `a-z A-Z 0-9 . _ -`, at most 64) plus Keen's collection
    /// rules (no leading `_`, no leading or trailing `.`), applied to both transports so that
    /// switching transport never changes what is accepted.
    public static func collectionProblem(_ name: String) -> String? {
        if name.isEmpty { return "a collection name cannot be empty" }
        if name.utf8.count > 64 { return "collection '\(name.prefix(80))' is longer than 64 characters" }
        if let bad = name.unicodeScalars.first(where: { !isCollectionCharacter($0) }) {
            return "collection '\(name)' has the character '\(bad.escaped(asASCII: true))' (allowed: a-z A-Z 0-9 . _ -)"
        }
        if name.hasPrefix("_") { return "collection '\(name)' starts with '_'" }
        if name.hasPrefix(".") || name.hasSuffix(".") { return "collection '\(name)' starts or ends with '.'" }
        return nil
    }

    static func isCollectionCharacter(_ c: Unicode.Scalar) -> Bool {
        switch c {
        case "a"..."z", "A"..."Z", "0"..."9", ".", "_", "-": return true
        default: return false
        }
    }
}

extension SluiceConfig {
    static func parseKeen(_ node: ConfigNode) throws(ConfigError) -> KeenDestination {
        try node.checkKeys([
            "kind", "project_id", "key", "collection", "transport", "bootstrap_servers", "http_base_url",
            "ssl_ca_certificate", "uniqueness_token", "include_user", "include_device", "include_application",
        ])
        let project = try node.requiredString("project_id")
        guard !project.isEmpty, project.utf8.allSatisfy({ isNameByte($0) }) else {
            throw node.fail("must be a Keen project id (letters, digits)", field: "project_id")
        }
        guard let key = try node.secret("key"), !key.value.isEmpty else { throw node.fail("is required", field: "key") }
        let collection = try node.requiredString("collection")
        // A template is checked with a sample type; the real names are checked per event.
        let sample = collection.replacingOccurrences(of: KeenDestination.eventTypePlaceholder, with: "custom_event")
        if let problem = KeenDestination.collectionProblem(sample) {
            throw node.fail(
                collection == sample ? problem : "\(problem) (with {event_type} = custom_event)", field: "collection")
        }
        var transport = KeenDestination.Transport.kafka
        if let t = try node.string("transport") {
            guard let parsed = KeenDestination.Transport(rawValue: t) else { throw node.fail("must be kafka or http", field: "transport") }
            transport = parsed
        }
        let bootstrap = try node.string("bootstrap_servers") ?? KeenDestination.defaultBootstrapServers
        let base = try node.string("http_base_url") ?? KeenDestination.defaultHTTPBaseURL
        guard let url = URL(string: base), url.scheme == "https" || url.scheme == "http", url.host != nil else {
            throw node.fail("must be an http(s) URL such as \(KeenDestination.defaultHTTPBaseURL)", field: "http_base_url")
        }
        let ca = try node.secret("ssl_ca_certificate")?.value
        if let ca, let problem = pemProblem(ca) { throw node.fail("must be PEM text: \(problem)", field: "ssl_ca_certificate") }
        return KeenDestination(
            projectID: project, key: key, collection: collection, transport: transport, bootstrapServers: bootstrap,
            httpBaseURL: base.hasSuffix("/") ? String(base.dropLast()) : base, sslCAPEM: ca,
            uniquenessToken: try node.bool("uniqueness_token") ?? true, includeUser: try node.bool("include_user") ?? true,
            includeDevice: try node.bool("include_device") ?? true,
            includeApplication: try node.bool("include_application") ?? true)
    }
}
