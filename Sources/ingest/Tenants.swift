import NIOConcurrencyHelpers
import Shared

/// The tenants of the running config, as ingest needs them: credentials (for authentication) and
/// destination names (for the spool's deliveries). Replaced whole on a config reload: requests
/// already authenticated finish under the config they started with; the next one sees the new.
final class Tenants: Sendable {
    private struct Snapshot {
        var authenticator: Authenticator
        var destinations: [String: [String]]
        var digest: String?
    }

    private let snapshot: NIOLockedValueBox<Snapshot>

    init(_ config: SluiceConfig, digest: String? = nil) {
        snapshot = NIOLockedValueBox(Self.snapshot(config, digest: digest))
    }

    func update(_ config: SluiceConfig, digest: String?) {
        let new = Self.snapshot(config, digest: digest)
        snapshot.withLockedValue { $0 = new }
    }

    /// The digest of the config file these tenants came from (sent with each batch to the router).
    var digest: String? { snapshot.withLockedValue { $0.digest } }

    var authenticator: Authenticator { snapshot.withLockedValue { $0.authenticator } }

    /// The destination names of a tenant (empty for an unknown tenant).
    func destinations(of tenant: String) -> [String] { snapshot.withLockedValue { $0.destinations[tenant] ?? [] } }

    /// Every tenant's destinations.
    var targets: [DeliveryTarget] {
        snapshot.withLockedValue { s in
            s.destinations.flatMap { tenant, names in names.map { DeliveryTarget(tenant: tenant, destination: $0) } }
        }
    }

    private static func snapshot(_ config: SluiceConfig, digest: String?) -> Snapshot {
        var map: [String: [String]] = [:]
        for t in config.tenants { map[t.id] = t.destinations.map(\.name) }
        return Snapshot(authenticator: Authenticator(tenants: config.tenants), destinations: map, digest: digest)
    }
}
