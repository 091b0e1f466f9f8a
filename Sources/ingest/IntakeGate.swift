import DequeModule
import NIOConcurrencyHelpers

/// Holds a stored request's `202` while the destinations that are flowing fall behind, so that
/// clients send no faster than Sluice delivers — the overload stays at the door instead of in the
/// spool. A request's batches are already durable when it is held; only its answer waits.
///
/// Why: at max load ingest took requests faster than the outputs delivered (per event with 1
/// tenant: 157k events/s accepted, 129k delivered); the surplus overflowed the feeder's memory
/// and was read back from the spool later, and SQLite took every batch older than a second — CPU
/// the router and kafka-out needed (docs/BENCHMARKS.md, session 16). Off unless
/// `ingest.max_answer_hold_ms` is set: with 50 tenants the holds cost 7–26% of the events delivered
/// at max load (the requests in flight cut where memory was only a buffer).
///
/// Who is behind is the feeder's call (`RouterLink.behind`): destinations that flow, holding
/// more than their share of the memory's hold mark. A destination that does not flow (refused by
/// the router, or stalled: down, its output gone) never slows anyone — its backlog is what the
/// spool is for. A request is held at most `maxHold`; then it is answered whatever the backlog.
final class IntakeGate: Sendable {
    /// Which requests are behind now: nil when none is (answer everything), else a test of a
    /// request's destinations.
    typealias Behind = @Sendable () -> (@Sendable ([DeliveryTarget]) -> Bool)?

    private struct Held {
        var since: ContinuousClock.Instant
        var targets: [DeliveryTarget]
        var answer: @Sendable () -> Void
    }

    private struct State {
        var held: Deque<Held> = []
        var sweeping = false
    }

    let maxHold: Duration
    private let state = NIOLockedValueBox(State())
    private let behind: Behind
    /// Runs `body` after `delay` (the sweep of answers held too long).
    private let schedule: @Sendable (_ delay: Duration, _ body: @escaping @Sendable () -> Void) -> Void

    init(
        maxHold: Duration, behind: @escaping Behind,
        schedule: @escaping @Sendable (_ delay: Duration, _ body: @escaping @Sendable () -> Void) -> Void
    ) {
        self.maxHold = maxHold
        self.behind = behind
        self.schedule = schedule
    }

    /// Answers held now.
    var heldCount: Int { state.withLockedValue { $0.held.count } }

    /// Runs `answer` now, or once the destinations in `targets` are no longer behind (at the
    /// latest after `maxHold`).
    func answer(for targets: [DeliveryTarget], _ answer: @escaping @Sendable () -> Void) {
        guard maxHold > .zero, let test = behind(), test(targets) else { return answer() }
        state.withLockedValue { $0.held.append(Held(since: .now, targets: targets, answer: answer)) }
        IngestMetrics.shared.answersHeld.increment()
        startSweep()
        // What held it may have cleared between the test and the queueing.
        release()
    }

    /// Answers the held requests that are no longer behind (called when the backlog shrank:
    /// deliveries sent, a destination paused, the router gone).
    func release() {
        // (Called on every pass of the feeder: nothing to do, and no lock, when holding is off.)
        guard maxHold > .zero, state.withLockedValue({ !$0.held.isEmpty }) else { return }
        let test = behind()
        let due = state.withLockedValue { s -> [Held] in
            guard let test else {
                defer { s.held.removeAll() }
                return Array(s.held)
            }
            var due: [Held] = []
            s.held.removeAll { h in
                guard !test(h.targets) else { return false }
                due.append(h)
                return true
            }
            return due
        }
        for h in due { h.answer() }
    }

    private func startSweep() {
        let start = state.withLockedValue { s -> Bool in
            defer { s.sweeping = true }
            return !s.sweeping
        }
        if start { schedule(Self.sweepInterval) { self.sweep() } }
    }

    static let sweepInterval = Duration.milliseconds(10)

    /// Answers those held longer than `maxHold`; runs every `sweepInterval` while any are held.
    private func sweep() {
        let now = ContinuousClock.now
        let (due, again) = state.withLockedValue { s -> ([Held], Bool) in
            var due: [Held] = []
            s.held.removeAll { h in
                guard now - h.since >= maxHold else { return false }
                due.append(h)
                return true
            }
            s.sweeping = !s.held.isEmpty
            return (due, s.sweeping)
        }
        if !due.isEmpty { IngestMetrics.shared.answersHeldTooLong.increment(by: Int64(due.count)) }
        for h in due { h.answer() }
        release()
        if again { schedule(Self.sweepInterval) { self.sweep() } }
    }
}
