// Sluice's JSON layer, settings application, frames and Keen events, each beside Foundation on the
// same input. Run with `swift package --scratch-path .build benchmark` (README.md).
import Benchmark
import Foundation
import MicroSupport

/// Megabytes of input batch processed per second, measured inside each sample around the inner loop.
let megabytesPerSecond = BenchmarkMetric.custom("MB/s (input)", polarity: .prefersLarger, useScalingFactor: false)

/// The measured operations, in table order: (group, operation, label). Each group ends with the
/// Foundation counterpart; the inputs are the 50-event ≈21 KB batch and the 3-event ≈1.9 KB one.
let suite: [(group: String, op: String, label: String)] = [
    ("1 scan", "validate", "Sluice JSON.validate"),
    ("1 scan", "batch-validate", "Sluice BatchValidator.validate (ingest)"),
    ("1 scan", "parse-tree", "Sluice JSONValue.parse (tree)"),
    ("1 scan", "foundation-validate", "Foundation JSONSerialization.jsonObject"),
    ("2 settings batch", "splice", "Sluice KafkaConnectionSettings.splice (router)"),
    ("2 settings batch", "apply", "Sluice parse + KafkaConnectionSettings.apply (tree)"),
    ("2 settings batch", "apply-tree", "Sluice apply only (tree given)"),
    ("2 settings batch", "foundation-apply", "Foundation parse + edit + serialize"),
    ("3 settings per-event", "splice-split", "Sluice splice, send_as_batch false (router)"),
    ("3 settings per-event", "split", "Sluice parse + apply (tree), send_as_batch false"),
    ("3 settings per-event", "split-tree", "Sluice apply only (tree given)"),
    ("3 settings per-event", "foundation-split", "Foundation parse + edit + serialize per event"),
    ("4 frame", "frame-encode", "Sluice Frame.encode"),
    ("4 frame", "foundation-frame-encode", "Foundation JSONEncoder (Codable, payload string)"),
    ("4 frame", "frame-decode", "Sluice FrameDecoder.next"),
    ("4 frame", "foundation-frame-decode", "Foundation JSONDecoder (Codable, payload string)"),
    ("4 frame", "frame-encode-split", "Sluice Frame.encode, a part per event (router, send_as_batch false)"),
    ("4 frame", "frame-decode-split", "Sluice FrameDecoder.next + messages, a part per event (kafka-out)"),
    ("5 keen", "keen", "Sluice parse + KeenDestination.events"),
    ("5 keen", "keen-tree", "Sluice events only (tree given)"),
    ("5 keen", "foundation-keen", "Foundation parse + build + serialize per event"),
]

/// Measured once with ProfileDriver: these take under about 50 µs per run on a 2-core EPYC.
let fast: Set<String> = [
    "frame-encode large", "validate small", "splice small", "batch-validate small", "apply-tree small", "frame-encode small",
    "frame-decode small", "foundation-frame-encode small",
]

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.throughput, .wallClock, .mallocCountTotal, megabytesPerSecond],
        timeUnits: .microseconds,
        warmupIterations: 3,
        maxDuration: .seconds(2),
        maxIterations: 10_000
    )
    // The inputs are made (and the Foundation counterparts checked against Sluice) once, up front.
    do {
        _ = try Checks.run()
    } catch {
        fatalError("Foundation counterparts disagree with Sluice: \(error)")
    }

    for input in ["large", "small"] {
        for entry in suite {
            let op = Operation.make(entry.op, input: input)
            // Operations under about 50 µs run 1000 times per sample (`.kilo`), so the harness's own
            // per-sample cost does not count; the others once per sample.
            let scaling: BenchmarkScalingFactor = fast.contains("\(entry.op) \(input)") ? .kilo : .one
            var configuration = Benchmark.defaultConfiguration
            configuration.scalingFactor = scaling
            Benchmark("\(entry.group) \(input): \(entry.label)", configuration: configuration) { benchmark in
                let start = ContinuousClock.now
                for _ in benchmark.scaledIterations { blackHole(op.run()) }
                let elapsed = ContinuousClock.now - start
                let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
                let bytes = Double(op.bytes * benchmark.scaledIterations.count)
                benchmark.measurement(megabytesPerSecond, Int((bytes / seconds / 1e6).rounded()))
            }
        }
    }
}
