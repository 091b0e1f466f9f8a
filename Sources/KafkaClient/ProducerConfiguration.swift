/// Typed producer settings. This is the one place that spells librdkafka's property names.
public struct ProducerConfiguration: Sendable, Equatable, Hashable {
    public enum SecurityProtocol: String, Sendable {
        case ssl = "ssl"
        case saslSSL = "sasl_ssl"
        /// Development only (the embedded mock cluster).
        case plaintext = "plaintext"
    }

    public enum SASLMechanism: String, Sendable {
        case plain = "PLAIN"
        case scramSHA256 = "SCRAM-SHA-256"
        case scramSHA512 = "SCRAM-SHA-512"
    }

    public struct SASL: Sendable, Equatable, Hashable {
        public var mechanism: SASLMechanism
        public var username: String
        public var password: String?
        public init(mechanism: SASLMechanism, username: String, password: String?) {
            self.mechanism = mechanism
            self.username = username
            self.password = password
        }
    }

    public struct TLS: Sendable, Equatable, Hashable {
        /// Client private key and certificate (PEM), for brokers that require client certificates.
        public var privateKeyPEM: String?
        public var certificatePEM: String?
        /// CA certificate(s) (PEM) that signed the brokers' certificates; nil: the system trust store.
        public var caPEM: String?
        public init(privateKeyPEM: String? = nil, certificatePEM: String? = nil, caPEM: String? = nil) {
            self.privateKeyPEM = privateKeyPEM
            self.certificatePEM = certificatePEM
            self.caPEM = caPEM
        }
    }

    public var bootstrapServers: String
    public var securityProtocol: SecurityProtocol
    public var sasl: SASL?
    public var tls: TLS
    public var clientID = "sluice"
    /// How long librdkafka may hold a message before reporting `_MSG_TIMED_OUT` (never dropped:
    /// a timed-out message is reported as a retryable failure).
    public var messageTimeout: Duration = ProducerTuning.defaultMessageTimeout
    public var linger: Duration = ProducerTuning.defaultLinger
    public var queueMaxMessages = 100_000
    public var queueMaxKilobytes = 64 * 1024
    /// How often librdkafka reports its statistics (queue depth, broker round trips); 0 = never.
    public var statisticsInterval: Duration = .seconds(5)
    /// Produce requests in flight per broker connection (librdkafka's default, 5, when nil).
    public var maxInFlight: Int?
    /// Hold each partition's next messages while it has 5 or more in flight (`PartitionRounds`),
    /// so that librdkafka's idempotent producer does not poll its sockets without pause meanwhile.
    /// It pays with batches (less CPU, a lower p99, more delivered) and far brokers, and costs a
    /// little per event (docs/BENCHMARKS.md, sessions 22–23): kafka-out turns it on for the
    /// producers of Send-as-Batch destinations (`ProducerTuning.partitionRounds`, `.batches`).
    public var partitionRounds = false

    /// The part of `linger` librdkafka keeps: with partition rounds half a millisecond (the rest
    /// is spent holding the messages), else all of it.
    public var librdkafkaLinger: Duration { partitionRounds ? min(linger, .microseconds(500)) : linger }

    public init(bootstrapServers: String, securityProtocol: SecurityProtocol, sasl: SASL? = nil, tls: TLS = TLS()) {
        self.bootstrapServers = bootstrapServers
        self.securityProtocol = securityProtocol
        self.sasl = sasl
        self.tls = tls
    }

    static func milliseconds(_ d: Duration) -> String { String(ProducerTuning.milliseconds(d)) }
    /// `d` in milliseconds, to the microsecond (librdkafka's `linger.ms` takes a fraction).
    static func fractionalMilliseconds(_ d: Duration) -> String {
        let (seconds, attoseconds) = d.components
        let microseconds = seconds * 1_000_000 + attoseconds / 1_000_000_000_000
        return microseconds % 1000 == 0 ? String(microseconds / 1000) : String(Double(microseconds) / 1000)
    }

    /// The librdkafka properties, in the order they are applied.
    public var properties: [(key: String, value: String)] {
        var p: [(key: String, value: String)] = [
            ("bootstrap.servers", bootstrapServers),
            ("client.id", clientID),
            // Durability: every in-sync replica has the message, and retries never reorder or duplicate.
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("message.timeout.ms", Self.milliseconds(messageTimeout)),
            ("linger.ms", Self.fractionalMilliseconds(librdkafkaLinger)),
            // Messages without a key (batches without an MPID) each go to a random partition (seed 000),
            // rather than sticking to one partition for a while.
            ("sticky.partitioning.linger.ms", "0"),
            ("queue.buffering.max.messages", String(queueMaxMessages)),
            ("queue.buffering.max.kbytes", String(queueMaxKilobytes)),
            // librdkafka's log lines go to the event queue and are read by our poll thread.
            ("log.queue", "true"),
            ("statistics.interval.ms", Self.milliseconds(statisticsInterval)),
            ("security.protocol", securityProtocol.rawValue),
        ]
        if let maxInFlight { p.append(("max.in.flight.requests.per.connection", String(maxInFlight))) }
        if securityProtocol != .plaintext {
            p.append(("ssl.endpoint.identification.algorithm", "https"))
            if let key = tls.privateKeyPEM { p.append(("ssl.key.pem", key)) }
            if let cert = tls.certificatePEM { p.append(("ssl.certificate.pem", cert)) }
            if let ca = tls.caPEM { p.append(("ssl.ca.pem", ca)) }
        }
        if let sasl {
            p.append(("sasl.mechanisms", sasl.mechanism.rawValue))
            p.append(("sasl.username", sasl.username))
            if let password = sasl.password { p.append(("sasl.password", password)) }
        }
        return p
    }

    /// Property names whose values must never be shown.
    public static let secretProperties: Set<String> = ["sasl.password", "ssl.key.pem", "ssl.key.password"]
}

/// Producer settings an operator chooses for a whole output process rather than per destination
/// (`kafka-out --message-timeout-ms --linger-ms --max-in-flight`); applied to every producer it makes.
public struct ProducerTuning: Sendable, Equatable {
    public static let defaultMessageTimeout: Duration = .seconds(300)
    public static let defaultLinger: Duration = .milliseconds(5)

    /// `duration` in whole milliseconds (the unit of kafka-out's options).
    public static func milliseconds(_ duration: Duration) -> Int {
        let (seconds, attoseconds) = duration.components
        return Int(seconds * 1000 + attoseconds / 1_000_000_000_000_000)
    }

    public var messageTimeout: Duration
    public var linger: Duration
    /// Produce requests in flight per broker connection; nil: librdkafka's default (5).
    public var maxInFlight: Int?
    /// Whose producers hold messages in partition rounds (`ProducerConfiguration.partitionRounds`).
    public var partitionRounds: PartitionRoundsScope

    public init(
        messageTimeout: Duration = defaultMessageTimeout, linger: Duration = defaultLinger, maxInFlight: Int? = nil,
        partitionRounds: PartitionRoundsScope = .batches
    ) {
        self.messageTimeout = messageTimeout
        self.linger = linger
        self.maxInFlight = maxInFlight
        self.partitionRounds = partitionRounds
    }

    /// Applies these settings to the producer of a destination that sends whole batches
    /// (`sendsBatches`, "Send as Batch") or one message per event.
    public func apply(to configuration: inout ProducerConfiguration, sendsBatches: Bool) {
        configuration.messageTimeout = messageTimeout
        configuration.linger = linger
        configuration.maxInFlight = maxInFlight
        configuration.partitionRounds = partitionRounds == .all || (partitionRounds == .batches && sendsBatches)
    }
}

/// Which producers hold their messages in partition rounds (`ProducerConfiguration.partitionRounds`):
/// none, those of destinations that send whole batches ("Send as Batch": few large messages, where
/// the rounds save librdkafka's busy poll at little cost per message), or all. A destination of
/// the other kind then has a producer of its own (its configuration differs).
public enum PartitionRoundsScope: String, Sendable, Hashable, CaseIterable {
    case off, batches, all
}
