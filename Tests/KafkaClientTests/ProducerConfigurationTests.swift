import KafkaClient
import Shared
import XCTest

@testable import kafka_out

/// Seed 000, "Authentication": the mapping from a destination's settings to librdkafka's properties.
final class ProducerConfigurationTests: XCTestCase {
    func properties(_ d: KafkaDestination) -> [String: String] {
        let config = ProducerConfiguration(destination: d, bootstrapServers: "b1:9093,b2:9093")
        var out: [String: String] = [:]
        for (k, v) in config.properties {
            XCTAssertNil(out[k], "\(k) is set twice")
            out[k] = v
        }
        return out
    }

    func testAlwaysDurable() {
        let p = properties(KafkaDestination(bootstrapServers: "x:1", topic: "t"))
        XCTAssertEqual(p["acks"], "all")
        XCTAssertEqual(p["enable.idempotence"], "true")
        XCTAssertEqual(p["bootstrap.servers"], "b1:9093,b2:9093")
        XCTAssertEqual(p["log.queue"], "true")
        XCTAssertEqual(p["message.timeout.ms"], "300000")
    }

    func testKafkaOutOptionsReachEveryProducer() throws {
        var config = ProducerConfiguration(destination: KafkaDestination(bootstrapServers: "x:1", topic: "t"), bootstrapServers: "b:1")
        try Run.parse(["--linger-ms", "20", "--max-in-flight", "1", "--message-timeout-ms", "2000", "--partition-rounds", "all"]).tuning.apply(
            to: &config, sendsBatches: false)
        let p = Dictionary(config.properties.map { ($0.key, $0.value) }, uniquingKeysWith: { a, _ in a })
        XCTAssertEqual(config.linger, .milliseconds(20))
        XCTAssertEqual(p["linger.ms"], "0.5", "with partition rounds librdkafka keeps half a millisecond of the linger")
        XCTAssertEqual(p["max.in.flight.requests.per.connection"], "1")
        XCTAssertEqual(p["message.timeout.ms"], "2000")
        XCTAssertEqual(p["enable.idempotence"], "true", "tuning never turns idempotence off")

        var defaults = ProducerConfiguration(destination: KafkaDestination(bootstrapServers: "x:1", topic: "t"), bootstrapServers: "b:1")
        try Run.parse([]).tuning.apply(to: &defaults, sendsBatches: false)
        let d = Dictionary(defaults.properties.map { ($0.key, $0.value) }, uniquingKeysWith: { a, _ in a })
        XCTAssertEqual(d["linger.ms"], "5")
        XCTAssertFalse(defaults.partitionRounds, "by default no rounds for a destination sending an event per message")
        XCTAssertNil(d["max.in.flight.requests.per.connection"], "librdkafka's default (5)")
        var batchDefaults = ProducerConfiguration(destination: KafkaDestination(bootstrapServers: "x:1", topic: "t"), bootstrapServers: "b:1")
        try Run.parse([]).tuning.apply(to: &batchDefaults, sendsBatches: true)
        XCTAssertTrue(batchDefaults.partitionRounds, "by default rounds for a destination sending batches")

        var withoutRounds = ProducerConfiguration(destination: KafkaDestination(bootstrapServers: "x:1", topic: "t"), bootstrapServers: "b:1")
        try Run.parse(["--linger-ms", "20", "--partition-rounds", "off"]).tuning.apply(to: &withoutRounds, sendsBatches: true)
        XCTAssertFalse(withoutRounds.partitionRounds)
        XCTAssertEqual(withoutRounds.properties.first { $0.key == "linger.ms" }?.value, "20", "librdkafka keeps all of it")

        XCTAssertThrowsError(try Run.parse(["--partition-rounds", "some"]))
        XCTAssertThrowsError(try Run.parse(["--max-in-flight", "6"]), "more than the idempotent producer allows")
        XCTAssertThrowsError(try Run.parse(["--linger-ms", "-1"]))
    }

    /// `--partition-rounds batches`: the producer of a destination sending whole batches holds its
    /// messages in rounds; one sending an event per message gets a producer of its own, without
    /// rounds, whose librdkafka keeps the whole linger.
    func testPartitionRoundsForBatchesOnlyGiveEachKindItsOwnProducer() throws {
        let publisher = KafkaPublisher(
            devBootstrapFile: "/nonexistent", tuning: try Run.parse(["--partition-rounds", "batches"]).tuning,
            logger: .init(label: "test"))
        var batches = KafkaConnectionSettings()
        batches.sendAsBatch = true
        var events = KafkaConnectionSettings()
        events.sendAsBatch = false
        // As kafka-out learns a destination: from the router's `destination` frame.
        func received(_ d: KafkaDestination) throws -> KafkaDestination { try KafkaDestination(wireJSON: d.wireJSON) }
        let batchConfig = try publisher.producerConfiguration(
            for: received(KafkaDestination(bootstrapServers: "b:1", topic: "t", settings: batches)))
        let eventConfig = try publisher.producerConfiguration(
            for: received(KafkaDestination(bootstrapServers: "b:1", topic: "t", settings: events)))
        XCTAssertTrue(batchConfig.partitionRounds)
        XCTAssertEqual(batchConfig.properties.first { $0.key == "linger.ms" }?.value, "0.5")
        XCTAssertFalse(eventConfig.partitionRounds)
        XCTAssertEqual(eventConfig.properties.first { $0.key == "linger.ms" }?.value, "5")
        XCTAssertNotEqual(batchConfig, eventConfig, "one producer each (the pool keys producers by configuration)")

        let all = KafkaPublisher(
            devBootstrapFile: "/nonexistent", tuning: try Run.parse(["--partition-rounds", "all"]).tuning, logger: .init(label: "test"))
        XCTAssertTrue(try all.producerConfiguration(for: received(KafkaDestination(bootstrapServers: "b:1", topic: "t", settings: events))).partitionRounds)
    }

    func testNoUsernameMeansSSL() {
        let p = properties(KafkaDestination(bootstrapServers: "x:1", topic: "t"))
        XCTAssertEqual(p["security.protocol"], "ssl")
        XCTAssertEqual(p["ssl.endpoint.identification.algorithm"], "https", "broker hostname must match its certificate")
        XCTAssertNil(p["sasl.mechanisms"])
        XCTAssertNil(p["sasl.username"])
        XCTAssertNil(p["ssl.ca.pem"], "no CA setting: the system trust store")
    }

    func testUsernameMeansSASLSSLWithEachMechanism() {
        for (mechanism, name) in [
            (KafkaDestination.SASLMechanism.plain, "PLAIN"), (.scramSHA256, "SCRAM-SHA-256"), (.scramSHA512, "SCRAM-SHA-512"),
        ] {
            let p = properties(
                KafkaDestination(bootstrapServers: "x:1", topic: "t", username: "u", password: Secret("pw"), saslMechanism: mechanism))
            XCTAssertEqual(p["security.protocol"], "sasl_ssl")
            XCTAssertEqual(p["sasl.mechanisms"], name)
            XCTAssertEqual(p["sasl.username"], "u")
            XCTAssertEqual(p["sasl.password"], "pw")
            XCTAssertEqual(p["ssl.endpoint.identification.algorithm"], "https")
        }
    }

    func testPEMsAreHandedOverAsStrings() {
        let p = properties(
            KafkaDestination(
                bootstrapServers: "x:1", topic: "t", sslKeyPEM: Secret("-----BEGIN PRIVATE KEY-----k"),
                sslCertificatePEM: "-----BEGIN CERTIFICATE-----c", sslCAPEM: "-----BEGIN CERTIFICATE-----ca"))
        XCTAssertEqual(p["ssl.key.pem"], "-----BEGIN PRIVATE KEY-----k")
        XCTAssertEqual(p["ssl.certificate.pem"], "-----BEGIN CERTIFICATE-----c")
        XCTAssertEqual(p["ssl.ca.pem"], "-----BEGIN CERTIFICATE-----ca")
    }

    func testPlaintextOnlyWhenExplicit() {
        let p = properties(KafkaDestination(bootstrapServers: "dev", topic: "t", plaintext: true))
        XCTAssertEqual(p["security.protocol"], "plaintext")
        XCTAssertNil(p["ssl.endpoint.identification.algorithm"])
    }

    func testLibrdkafkaAcceptsEveryCombination() throws {
        // librdkafka itself validates the property set when a producer is created.
        for d in [
            KafkaDestination(bootstrapServers: "x:1", topic: "t"),
            KafkaDestination(bootstrapServers: "x:1", topic: "t", username: "u", password: Secret("p"), saslMechanism: .scramSHA512),
            KafkaDestination(bootstrapServers: "x:1", topic: "t", plaintext: true),
        ] {
            let config = ProducerConfiguration(destination: d, bootstrapServers: "127.0.0.1:1")
            XCTAssertNoThrow(try KafkaProducer(configuration: config, logger: .init(label: "t"), onDelivery: { _ in }))
        }
    }

    func testRejectedPropertyNeverShowsASecret() {
        var config = ProducerConfiguration(
            bootstrapServers: "x:1", securityProtocol: .saslSSL,
            sasl: .init(mechanism: .plain, username: "u", password: "TOPSECRET"))
        config.queueMaxMessages = -5  // invalid: librdkafka refuses it
        XCTAssertThrowsError(try KafkaProducer(configuration: config, logger: .init(label: "t"), onDelivery: { _ in })) { error in
            XCTAssertFalse("\(error)".contains("TOPSECRET"))
            XCTAssertTrue("\(error)".contains("queue.buffering.max.messages"), "\(error)")
        }
    }
}
