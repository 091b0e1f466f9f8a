import Observability
import Prometheus

/// ingest's Prometheus metrics. Labels: endpoint and rejection reason only (never tenants).
struct IngestMetrics: Sendable {
    static let shared = IngestMetrics()

    let batchesAccepted = Metrics.counter("sluice_ingest_batches_accepted_total", "Batches stored in the spool and answered 202.")
    let eventsAccepted = Metrics.counter("sluice_ingest_events_accepted_total", "Events in the accepted batches.")
    let bytesAccepted = Metrics.counter("sluice_ingest_accepted_bytes_total", "Bytes of the accepted batches.")
    let deadLettered = Metrics.counter(
        "sluice_ingest_dead_letters_total", "Deliveries moved to the dead-letter store (permanent failure or backlog cap).")
    let spoolBytes = Metrics.gauge("sluice_ingest_spool_bytes", "Bytes of batches held in the spool.")
    let spoolLimit = Metrics.gauge("sluice_ingest_spool_limit_bytes", "The spool's size limit (ingest.spool_max_bytes).")
    let spoolPending = Metrics.gauge(
        "sluice_ingest_spool_pending_deliveries", "Deliveries (a batch for one destination) waiting in the spool.")
    let spoolCommit = Metrics.histogram(
        "sluice_ingest_spool_commit_seconds",
        "One group of spool appends: the requests queued while the previous group was written, as log records, and its fdatasync.")
    let spoolPayloadWrite = Metrics.histogram(
        "sluice_ingest_spool_payload_write_seconds",
        "The log's part of a group of appends: one write of the group's records and its fdatasync.")
    let spoolApply = Metrics.histogram(
        "sluice_ingest_spool_apply_seconds",
        "Applying the spool's log to SQLite (every 100 ms): the batches still waiting, completions, dead letters, one fsync'd commit.")
    let spoolCommittedOperations = Metrics.counter(
        "sluice_ingest_spool_committed_operations_total",
        "Appends (one per request) and completions taken by the spool's writer; divided by the commits, the group size.")
    let spoolReadBack = Metrics.counter(
        "sluice_ingest_spool_read_back_total",
        "Deliveries read back from the spool to be sent (after a restart, a refusal or a reconnect, or when the memory for just-spooled ones was full).")
    let deliveriesSent = Metrics.counter(
        "sluice_ingest_deliveries_sent_total", "Deliveries (a batch for one destination) sent to the router, resends included.")
    let routerRefusals = Metrics.counter(
        "sluice_ingest_router_refusals_total", "Deliveries the router could not take (its backlog was full): sent again later.")
    let answersHeld = Metrics.counter(
        "sluice_ingest_answers_held_total",
        "Stored requests whose 202 waited for their destinations to catch up (ingest.max_answer_hold_ms).")
    let answersHeldTooLong = Metrics.counter(
        "sluice_ingest_answers_held_too_long_total", "Held 202s sent after ingest.max_answer_hold_ms, their destinations still behind.")
    let routerConnected = Metrics.gauge("sluice_ingest_router_connected", "1 when the router connection is up.")
    let ready = Metrics.gauge("sluice_ingest_ready", "1 when /readyz says ready.")

    private static let reasons = [
        "BAD_REQUEST", "UNAUTHORIZED", "FORBIDDEN", "PAYLOAD_TOO_LARGE", "UNSUPPORTED_MEDIA_TYPE", "TOO_MANY_REQUESTS",
        "SERVICE_UNAVAILABLE", "INTERNAL_ERROR",
    ]
    private let rejected: [String: Counter]
    private let durations: [String: DurationHistogram]

    /// Requests answered with an error, by reason (the error code, lower case).
    func rejected(_ code: String) -> Counter { rejected[code] ?? rejected["INTERNAL_ERROR"]! }
    func duration(bulk: Bool) -> DurationHistogram { durations[bulk ? "bulkevents" : "events"]! }

    private init() {
        var rejected: [String: Counter] = [:]
        for code in Self.reasons {
            rejected[code] = Metrics.counter(
                "sluice_ingest_requests_rejected_total", "Requests answered with an error, by reason.",
                [("reason", code.lowercased())])
        }
        self.rejected = rejected
        var durations: [String: DurationHistogram] = [:]
        for endpoint in ["events", "bulkevents"] {
            durations[endpoint] = Metrics.histogram(
                "sluice_ingest_request_duration_seconds", "From request start to the answer (202 only after the spool's fsync).",
                [("endpoint", endpoint)])
        }
        self.durations = durations
    }
}
