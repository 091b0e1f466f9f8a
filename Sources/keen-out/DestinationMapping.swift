import KafkaClient
import Shared

extension ProducerConfiguration {
    /// Keen's Kafka Inbound Cluster (seed 004): SASL_SSL with PLAIN, the project id as username and
    /// the key as password; acks=all (the shared default). No transactions, no admin calls, no
    /// consumer: keen-out only produces.
    init(keen d: KeenDestination) {
        self.init(
            bootstrapServers: d.bootstrapServers, securityProtocol: .saslSSL,
            sasl: SASL(mechanism: .plain, username: d.projectID, password: d.key.value), tls: TLS(caPEM: d.sslCAPEM))
        self.clientID = "sluice-keen-out"
    }
}
