import Foundation
import Yams

/// The whole configuration: one YAML file (see README, "Configuration reference").
public struct SluiceConfig: Sendable, Equatable {
    public var ingest: IngestSettings
    public var tenants: [Tenant]

    public init(ingest: IngestSettings = IngestSettings(), tenants: [Tenant]) {
        self.ingest = ingest
        self.tenants = tenants
    }

    public func tenant(id: String) -> Tenant? { tenants.first { $0.id == id } }

    /// Whether any destination uses the embedded development cluster.
    public var usesDevCluster: Bool {
        tenants.contains { $0.destinations.contains { if case .kafka(let k) = $0.kind { return k.usesDevCluster } else { return false } } }
    }
}

public struct IngestSettings: Sendable, Equatable {
    public var host = "127.0.0.1"
    public var port = 8080
    public var maxBatchBytes = 128 * 1024
    public var maxRequestBytes = 256 * 1024
    public var maxBatchesPerRequest = 100
    /// The spool's size limit; beyond it ingest answers 429 and is not ready.
    public var spoolMaxBytes = 1 << 30
    /// Batches kept waiting for one destination at most; beyond it the oldest are dead-lettered.
    public var maxBacklogPerDestination = 100_000
    /// How long a stored request's 202 may wait while its destinations fall behind (0: never, the
    /// default: see README "Overload").
    public var maxAnswerHoldMs = 0
    /// How long the spool's writer waits after a large group before it takes the next (µs): see
    /// README "Operations".
    public var spoolCommitDelayUs = 1000
    public init() {}
}

public struct Tenant: Sendable, Equatable {
    public var id: String
    public var apiKey: String
    public var apiSecret: Secret
    public var destinations: [Destination]

    public init(id: String, apiKey: String, apiSecret: Secret, destinations: [Destination]) {
        self.id = id
        self.apiKey = apiKey
        self.apiSecret = apiSecret
        self.destinations = destinations
    }
}

public struct Destination: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        case kafka(KafkaDestination)
        case keen(KeenDestination)
    }

    public var name: String
    public var kind: Kind

    public init(name: String, kind: Kind) {
        self.name = name
        self.kind = kind
    }

    /// The output process role that serves this destination.
    public var role: PeerRole {
        switch kind {
        case .kafka: return .kafkaOut
        case .keen: return .keenOut
        }
    }
}

/// A tenant's Kafka destination (seed 000: "Configuration Settings").
public struct KafkaDestination: Sendable, Equatable {
    public enum SASLMechanism: String, Sendable, CaseIterable {
        case plain = "PLAIN"
        case scramSHA256 = "SCRAM-SHA-256"
        case scramSHA512 = "SCRAM-SHA-512"
    }

    /// `dev` names the embedded development cluster (`kafka-out dev-cluster`).
    public var bootstrapServers: String
    public var topic: String
    public var username: String?
    public var password: Secret?
    public var saslMechanism: SASLMechanism
    public var sslKeyPEM: Secret?
    public var sslCertificatePEM: String?
    public var sslCAPEM: String?
    /// Development only: no TLS. Never the default; logged as a warning.
    public var plaintext: Bool
    /// What is sent: filters, projections, one message per batch or per event.
    public var settings: KafkaConnectionSettings

    public init(
        bootstrapServers: String, topic: String, username: String? = nil, password: Secret? = nil,
        saslMechanism: SASLMechanism = .plain, sslKeyPEM: Secret? = nil, sslCertificatePEM: String? = nil,
        sslCAPEM: String? = nil, plaintext: Bool = false, settings: KafkaConnectionSettings = KafkaConnectionSettings()
    ) {
        self.settings = settings
        self.bootstrapServers = bootstrapServers
        self.topic = topic
        self.username = username
        self.password = password
        self.saslMechanism = saslMechanism
        self.sslKeyPEM = sslKeyPEM
        self.sslCertificatePEM = sslCertificatePEM
        self.sslCAPEM = sslCAPEM
        self.plaintext = plaintext
    }

    public static let devClusterName = "dev"
    public var usesDevCluster: Bool { bootstrapServers == Self.devClusterName }
}

// MARK: Loading

extension SluiceConfig {
    /// Loads and validates a config file. Every error names the file, line, tenant, destination and field.
    public static func load(path: String, environment: [String: String] = ProcessInfo.processInfo.environment)
        throws(ConfigError) -> SluiceConfig
    {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(file: path, problem: "cannot read the config file")
        }
        return try parse(yaml: String(decoding: data, as: UTF8.self), file: path, environment: environment)
    }

    public static func parse(yaml: String, file: String = "<config>", environment: [String: String] = [:])
        throws(ConfigError) -> SluiceConfig
    {
        let root: Node
        do {
            guard let node = try Yams.compose(yaml: yaml) else {
                throw ConfigError(file: file, problem: "the config file is empty")
            }
            root = node
        } catch let e as ConfigError {
            throw e
        } catch let e as YamlError {
            throw ConfigError(file: file, problem: "not valid YAML: \(e)")
        } catch {
            throw ConfigError(file: file, problem: "not valid YAML: \(error)")
        }
        let top = ConfigNode(node: root, file: file, path: "", environment: environment)
        try top.checkKeys(["ingest", "tenants"])

        var config = SluiceConfig(tenants: [])
        if let ingest = try top.child("ingest") {
            config.ingest = try parseIngest(ingest)
        }
        guard let tenants = try top.child("tenants") else {
            throw top.fail("is required (a mapping of tenant id to tenant)", field: "tenants")
        }
        var keys: [String: String] = [:]
        for (id, node) in try tenants.entries() {
            var node = node
            node.tenant = id
            node.path = ""
            guard isValidName(id) else {
                throw node.fail("tenant ids may use only a-z A-Z 0-9 . _ - (1 to 64 characters)")
            }
            let tenant = try parseTenant(id: id, node)
            if let other = keys[tenant.apiKey] {
                throw node.fail("api_key is already used by tenant '\(other)'; each tenant needs its own", field: "api_key")
            }
            keys[tenant.apiKey] = id
            config.tenants.append(tenant)
        }
        return config
    }

    static func isValidName(_ s: String) -> Bool {
        !s.isEmpty && s.utf8.count <= 64 && s.utf8.allSatisfy { isNameByte($0) }
    }

    static func isNameByte(_ b: UInt8) -> Bool {
        (b >= UInt8(ascii: "a") && b <= UInt8(ascii: "z")) || (b >= UInt8(ascii: "A") && b <= UInt8(ascii: "Z"))
            || (b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9")) || b == UInt8(ascii: ".") || b == UInt8(ascii: "_")
            || b == UInt8(ascii: "-")
    }

    static func parseIngest(_ node: ConfigNode) throws(ConfigError) -> IngestSettings {
        try node.checkKeys([
            "listen", "max_batch_bytes", "max_request_bytes", "max_batches_per_request", "spool_max_bytes",
            "max_backlog_per_destination", "max_answer_hold_ms", "spool_commit_delay_us",
        ])
        var s = IngestSettings()
        if let listen = try node.string("listen") {
            guard let colon = listen.lastIndex(of: ":"), let port = Int(listen[listen.index(after: colon)...]),
                (0...65535).contains(port), colon != listen.startIndex
            else { throw node.fail("must be HOST:PORT, for example 127.0.0.1:8080", field: "ingest.listen") }
            s.host = String(listen[..<colon])
            s.port = port
        }
        // A batch travels in one frame between processes (at most 4 MiB with its envelope).
        s.maxBatchBytes = try node.int("max_batch_bytes", range: 1024...(2 << 20)) ?? s.maxBatchBytes
        s.maxRequestBytes = try node.int("max_request_bytes", range: 1024...(64 << 20)) ?? s.maxRequestBytes
        s.maxBatchesPerRequest = try node.int("max_batches_per_request", range: 1...10_000) ?? s.maxBatchesPerRequest
        s.spoolMaxBytes = try node.int("spool_max_bytes", range: (1 << 16)...(1 << 50)) ?? s.spoolMaxBytes
        s.maxBacklogPerDestination =
            try node.int("max_backlog_per_destination", range: 1...100_000_000) ?? s.maxBacklogPerDestination
        s.maxAnswerHoldMs = try node.int("max_answer_hold_ms", range: 0...10_000) ?? s.maxAnswerHoldMs
        s.spoolCommitDelayUs = try node.int("spool_commit_delay_us", range: 0...100_000) ?? s.spoolCommitDelayUs
        return s
    }

    static func parseTenant(id: String, _ node: ConfigNode) throws(ConfigError) -> Tenant {
        try node.checkKeys(["api_key", "api_secret", "destinations"])
        let key = try node.requiredString("api_key")
        guard let secret = try node.secret("api_secret") else { throw node.fail("is required", field: "api_secret") }
        var destinations: [Destination] = []
        if let list = try node.child("destinations") {
            for (name, dnode) in try list.entries() {
                var dnode = dnode
                dnode.destination = name
                dnode.path = ""
                guard isValidName(name) else {
                    throw dnode.fail("destination names may use only a-z A-Z 0-9 . _ - (1 to 64 characters)")
                }
                destinations.append(try parseDestination(name: name, dnode))
            }
        }
        return Tenant(id: id, apiKey: key, apiSecret: secret, destinations: destinations)
    }

    static func parseDestination(name: String, _ node: ConfigNode) throws(ConfigError) -> Destination {
        _ = try node.mapping()
        let kind = try node.requiredString("kind")
        switch kind {
        case "kafka":
            return Destination(name: name, kind: .kafka(try parseKafka(node)))
        case "keen":
            return Destination(name: name, kind: .keen(try parseKeen(node)))
        default:
            throw node.fail("unknown destination kind '\(kind)' (known: kafka, keen)", field: "kind")
        }
    }

    static func parseKafka(_ node: ConfigNode) throws(ConfigError) -> KafkaDestination {
        try node.checkKeys([
            "kind", "bootstrap_servers", "topic", "username", "password", "sasl_mechanism",
            "ssl_private_key", "ssl_certificate", "ssl_ca_certificate", "plaintext", "settings",
        ])
        let bootstrap = try node.requiredString("bootstrap_servers")
        if bootstrap != KafkaDestination.devClusterName {
            for server in bootstrap.split(separator: ",", omittingEmptySubsequences: false) {
                let s = server.trimmingCharacters(in: .whitespaces)
                guard let colon = s.lastIndex(of: ":"), colon != s.startIndex,
                    let port = Int(s[s.index(after: colon)...]), (1...65535).contains(port)
                else {
                    throw node.fail(
                        "'\(s)' is not HOST:PORT (a comma-separated list of brokers, or 'dev' for the embedded cluster)",
                        field: "bootstrap_servers")
                }
            }
        }
        let topic = try node.requiredString("topic")
        guard topic.utf8.count <= 249, topic != ".", topic != "..", topic.utf8.allSatisfy(isNameByte) else {
            throw node.fail("Kafka topic names may use only a-z A-Z 0-9 . _ - (at most 249 characters)", field: "topic")
        }
        let username = try node.string("username").flatMap { $0.isEmpty ? nil : $0 }
        let password = try node.secret("password")
        if password != nil && username == nil {
            throw node.fail("a password is set without a username (a password needs a username)", field: "password")
        }
        var mechanism = KafkaDestination.SASLMechanism.plain
        if let m = try node.string("sasl_mechanism") {
            guard let parsed = KafkaDestination.SASLMechanism(rawValue: m.uppercased()) else {
                throw node.fail("must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", field: "sasl_mechanism")
            }
            guard username != nil else {
                throw node.fail("a SASL mechanism is set without a username", field: "sasl_mechanism")
            }
            mechanism = parsed
        }
        let key = try node.secret("ssl_private_key")
        let certificate = try node.secret("ssl_certificate")?.value
        let ca = try node.secret("ssl_ca_certificate")?.value
        for (field, pem) in [("ssl_private_key", key?.value), ("ssl_certificate", certificate), ("ssl_ca_certificate", ca)] {
            if let pem, let problem = pemProblem(pem) {
                throw node.fail("must be PEM text: \(problem)", field: field)
            }
        }
        if (key == nil) != (certificate == nil) {
            throw node.fail("ssl_private_key and ssl_certificate go together (a client certificate needs its key)",
                field: key == nil ? "ssl_private_key" : "ssl_certificate")
        }
        let plaintext = try node.bool("plaintext") ?? false
        if plaintext && (username != nil || key != nil || ca != nil) {
            throw node.fail("plaintext cannot be combined with username, password or TLS settings", field: "plaintext")
        }
        if bootstrap == KafkaDestination.devClusterName && !plaintext {
            throw node.fail("the embedded dev cluster speaks plaintext only: add 'plaintext: true'", field: "bootstrap_servers")
        }
        let settings = try node.child("settings").map(parseKafkaSettings) ?? KafkaConnectionSettings()
        return KafkaDestination(
            bootstrapServers: bootstrap, topic: topic, username: username, password: password, saslMechanism: mechanism,
            sslKeyPEM: key, sslCertificatePEM: certificate, sslCAPEM: ca, plaintext: plaintext, settings: settings)
    }

    /// Checks the structure of PEM text: one or more BEGIN/END blocks with base64 between them.
    /// Returns what is wrong, never the text itself (it may be a private key).
    static func pemProblem(_ pem: String) -> String? {
        let lines = pem.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        var blocks = 0
        var label: String?
        var body = ""
        for line in lines {
            if line.hasPrefix("-----BEGIN ") && line.hasSuffix("-----") {
                guard label == nil else { return "a BEGIN line inside another block" }
                label = String(line.dropFirst(11).dropLast(5))
                body = ""
            } else if line.hasPrefix("-----END ") && line.hasSuffix("-----") {
                guard let open = label, String(line.dropFirst(9).dropLast(5)) == open else {
                    return "an END line that does not match its BEGIN line"
                }
                guard !body.isEmpty, Data(base64Encoded: body) != nil else { return "the \(open) block is not valid base64" }
                blocks += 1
                label = nil
            } else if label != nil {
                if line.contains(":") { continue }  // encrypted-key headers such as Proc-Type
                body += line
            } else {
                return "text outside a -----BEGIN ...----- / -----END ...----- block"
            }
        }
        if label != nil { return "a block without its END line" }
        return blocks == 0 ? "no -----BEGIN ...----- block" : nil
    }

    static func parseKafkaSettings(_ node: ConfigNode) throws(ConfigError) -> KafkaConnectionSettings {
        let flags: [(String, WritableKeyPath<KafkaConnectionSettings, Bool>)] = [
            ("send_network_performance_events", \.sendNetworkPerformanceEvents),
            ("send_as_batch", \.sendAsBatch),
            ("include_location", \.includeLocation),
            ("send_profile_change_events", \.sendProfileChangeEvents),
            ("include_metadata", \.includeMetadata),
            ("include_user_attribute_change_events", \.includeUserAttributeChangeEvents),
            ("include_user_identity_change_events", \.includeUserIdentityChangeEvents),
            ("send_batches_without_events", \.sendBatchesWithoutEvents),
            ("include_mp_deviceid", \.includeMPDeviceID),
            ("include_event_batch_location", \.includeEventBatchLocation),
        ]
        try node.checkKeys(Set(flags.map(\.0) + ["unique_id", "metadata_field_exclusion"]))
        var settings = KafkaConnectionSettings()
        for (key, path) in flags {
            if let value = try node.bool(key) { settings[keyPath: path] = value }
        }
        settings.uniqueID = try node.string("unique_id").flatMap { $0.isEmpty ? nil : $0 }
        if let list = try node.child("metadata_field_exclusion") {
            guard let items = list.node.sequence else {
                throw list.fail("must be a list of: device_name, ip_address")
            }
            for item in items {
                guard let name = item.string, let field = KafkaConnectionSettings.MetadataField(rawValue: name) else {
                    throw list.fail("unknown metadata field '\(item.string ?? "?")' (known: device_name, ip_address)", at: item)
                }
                settings.metadataFieldExclusion.insert(field)
            }
        }
        return settings
    }
}
