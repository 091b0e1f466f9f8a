import KafkaClient
import Shared

extension ProducerConfiguration {
    /// A destination's settings as producer settings (seed 000, "Authentication"): always TLS; no
    /// username → SSL; a username → SASL_SSL with its mechanism; plaintext only when the destination
    /// says so explicitly.
    init(destination d: KafkaDestination, bootstrapServers: String) {
        let securityProtocol: SecurityProtocol
        var sasl: SASL?
        if d.plaintext {
            securityProtocol = .plaintext
        } else if let username = d.username {
            securityProtocol = .saslSSL
            let mechanism: SASLMechanism
            switch d.saslMechanism {
            case .plain: mechanism = .plain
            case .scramSHA256: mechanism = .scramSHA256
            case .scramSHA512: mechanism = .scramSHA512
            }
            sasl = SASL(mechanism: mechanism, username: username, password: d.password?.value)
        } else {
            securityProtocol = .ssl
        }
        self.init(
            bootstrapServers: bootstrapServers, securityProtocol: securityProtocol, sasl: sasl,
            tls: TLS(privateKeyPEM: d.sslKeyPEM?.value, certificatePEM: d.sslCertificatePEM, caPEM: d.sslCAPEM))
        self.clientID = "sluice-kafka-out"
    }
}
