import NIOCore

/// How the router tells an output process what a destination is: a `destination` frame whose id is
/// the destination's key and whose payload is this JSON. The key changes whenever the settings do,
/// so a batch always goes out with the settings it was routed under.
extension KafkaDestination {
    public var wireJSON: JSONValue {
        var members: [JSONValue.Member] = [
            .init("kind", .string("kafka")),
            .init("bootstrap_servers", .string(bootstrapServers)),
            .init("topic", .string(topic)),
            .init("sasl_mechanism", .string(saslMechanism.rawValue)),
            .init("plaintext", .bool(plaintext)),
            // The router applies the settings; kafka-out only needs to know the kind of messages
            // (whole batches or one per event: its producers' partition rounds depend on it).
            .init("send_as_batch", .bool(settings.sendAsBatch)),
        ]
        func add(_ key: String, _ value: String?) { if let value { members.append(.init(key, .string(value))) } }
        add("username", username)
        add("password", password?.value)
        add("ssl_private_key", sslKeyPEM?.value)
        add("ssl_certificate", sslCertificatePEM)
        add("ssl_ca_certificate", sslCAPEM)
        return .object(members)
    }

    public init(wireJSON json: JSONValue) throws(FrameError) {
        guard json["kind"]?.stringValue == "kafka", let bootstrap = json["bootstrap_servers"]?.stringValue,
            let topic = json["topic"]?.stringValue,
            let mechanism = KafkaDestination.SASLMechanism(rawValue: json["sasl_mechanism"]?.stringValue ?? "PLAIN")
        else { throw .invalidFrame("destination payload is not a Kafka destination") }
        self.init(
            bootstrapServers: bootstrap, topic: topic, username: json["username"]?.stringValue,
            password: json["password"]?.stringValue.map(Secret.init), saslMechanism: mechanism,
            sslKeyPEM: json["ssl_private_key"]?.stringValue.map(Secret.init),
            sslCertificatePEM: json["ssl_certificate"]?.stringValue, sslCAPEM: json["ssl_ca_certificate"]?.stringValue,
            plaintext: json["plaintext"] == .bool(true))
        settings.sendAsBatch = json["send_as_batch"] != .bool(false)
    }
}

extension Destination {
    /// `kafka` or `keen`: the `kind` of the config, used in status and metrics labels.
    public var kindName: String {
        switch kind {
        case .kafka: return "kafka"
        case .keen: return "keen"
        }
    }

    public var wireJSON: JSONValue {
        switch kind {
        case .kafka(let k): return k.wireJSON
        case .keen(let k): return k.wireJSON
        }
    }

    /// `tenant/name#generation`: names the destination and the settings it had when routed. The
    /// router bumps the generation whenever a reload changes the destination's settings, so a batch
    /// always goes out with the settings it was routed under. (No hash of the settings: they hold secrets.)
    public func wireKey(tenant: String, generation: Int) -> String {
        "\(tenant)/\(name)#\(generation)"
    }
}

/// What keen-out needs of a Keen destination (the router has already made the events).
extension KeenDestination {
    public var wireJSON: JSONValue {
        var members: [JSONValue.Member] = [
            .init("kind", .string("keen")), .init("project_id", .string(projectID)), .init("key", .string(key.value)),
            .init("transport", .string(transport.rawValue)), .init("bootstrap_servers", .string(bootstrapServers)),
            .init("http_base_url", .string(httpBaseURL)),
        ]
        if let ca = sslCAPEM { members.append(.init("ssl_ca_certificate", .string(ca))) }
        return .object(members)
    }

    public init(wireJSON json: JSONValue) throws(FrameError) {
        guard json["kind"]?.stringValue == "keen", let project = json["project_id"]?.stringValue,
            let key = json["key"]?.stringValue,
            let transport = KeenDestination.Transport(rawValue: json["transport"]?.stringValue ?? "kafka")
        else { throw .invalidFrame("destination payload is not a Keen destination") }
        self.init(
            projectID: project, key: Secret(key), collection: "-", transport: transport,
            bootstrapServers: json["bootstrap_servers"]?.stringValue ?? KeenDestination.defaultBootstrapServers,
            httpBaseURL: json["http_base_url"]?.stringValue ?? KeenDestination.defaultHTTPBaseURL,
            sslCAPEM: json["ssl_ca_certificate"]?.stringValue)
    }
}
