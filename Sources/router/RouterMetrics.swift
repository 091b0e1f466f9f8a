import Observability
import Prometheus
import Shared

/// The router's Prometheus metrics. Labels: output kind and outcome only.
struct RouterMetrics: Sendable {
    let batchesReceived = Metrics.counter(
        "sluice_router_deliveries_received_total", "Deliveries (a batch for one destination) received from ingest.")
    let eventsUnsupported = Metrics.counter(
        "sluice_router_events_dropped_total", "Events not forwarded.", [("reason", "unsupported_type")])
    let eventsFiltered = Metrics.counter(
        "sluice_router_events_dropped_total", "Events not forwarded.", [("reason", "settings")])

    private static let kinds: [PeerRole: String] = [.kafkaOut: "kafka", .keenOut: "keen"]
    private let messageCounters: [PeerRole: [String: Counter]]
    private let backlogGauges: [PeerRole: Gauge]
    private let outputGauges: [PeerRole: Gauge]
    private let durations: [PeerRole: DurationHistogram]

    func messages(_ role: PeerRole, _ outcome: String) -> Counter { messageCounters[role]![outcome]! }
    func backlog(_ role: PeerRole) -> Gauge { backlogGauges[role]! }
    func outputs(_ role: PeerRole) -> Gauge { outputGauges[role]! }
    func deliveryDuration(_ role: PeerRole) -> DurationHistogram { durations[role]! }

    init() {
        // All series exist from the start (at 0), so dashboards and alerts see them before the first event.
        var messages: [PeerRole: [String: Counter]] = [:]
        var backlog: [PeerRole: Gauge] = [:]
        var outputs: [PeerRole: Gauge] = [:]
        var durations: [PeerRole: DurationHistogram] = [:]
        for (role, kind) in Self.kinds {
            for outcome in ["delivered", "retried", "dead_lettered"] {
                messages[role, default: [:]][outcome] = Metrics.counter(
                    "sluice_router_messages_total", "Messages finished by outputs, by outcome (delivered, retried, dead_lettered).",
                    [("kind", kind), ("outcome", outcome)])
            }
            backlog[role] = Metrics.gauge(
                "sluice_router_backlog_messages", "Messages routed and not yet confirmed by an output.", [("kind", kind)])
            outputs[role] = Metrics.gauge("sluice_router_outputs", "Output instances connected.", [("kind", kind)])
            durations[role] = Metrics.histogram(
                "sluice_router_delivery_duration_seconds",
                "From sending a message to an output until its ack or nack (a frame round trip plus the broker's confirmation).",
                [("kind", kind)])
        }
        messageCounters = messages
        backlogGauges = backlog
        outputGauges = outputs
        self.durations = durations
    }
}
