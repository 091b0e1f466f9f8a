import Foundation
import Glibc

// spool-bench [--seconds 3] [--reps 3] [--groups 1,8,64] [--dests 1,3] [--recovery 100000] [--payload 20480]
//   [--stores sqlite,sqlite-cached,sqlite-full,sqlite-full-cached,log] [--dir PATH (default: new /work/spool-bench.XXXXXX)]
var options: [String: String] = [:]
var argv = CommandLine.arguments.dropFirst().makeIterator()
while let a = argv.next() { if a.hasPrefix("--") { options[String(a.dropFirst(2))] = argv.next() ?? "" } }
func list(_ k: String, _ d: String) -> [String] { (options[k] ?? d).split(separator: ",").map(String.init) }
let (seconds, reps) = (Double(options["seconds"] ?? "3")!, Int(options["reps"] ?? "3")!)
let (groups, destCounts) = (list("groups", "1,8,64").map { Int($0)! }, list("dests", "1,3").map { Int($0)! })
let stores = list("stores", "sqlite,sqlite-cached,sqlite-full,sqlite-full-cached,log")
let (recoveryRecords, payloadBytes) = (Int(options["recovery"] ?? "100000")!, Int(options["payload"] ?? "20480")!)
let backlog = 256  // batches waiting per destination during a run; completions keep it there
let root = options["dir"] ?? { var t = Array("/work/spool-bench.XXXXXX".utf8CString); return String(cString: mkdtemp(&t)!) }()
let payloads: [Data] = (0..<64).map { _ in Data((0..<payloadBytes).map { _ in UInt8.random(in: 0...255) }) }
precondition(Array("123456789".utf8).withUnsafeBytes(crc32c) == 0xE306_9283, "CRC32C check value")

func openStore(_ kind: String, _ dir: String) throws -> Store {
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    if kind == "log" { return try LogStore(directory: dir) }
    guard kind.hasPrefix("sqlite") else { throw BenchError("unknown store \(kind)") }
    return try SQLiteStore(directory: dir, cached: kind.hasSuffix("cached"), forceFull: kind.contains("full"))
}

struct Run { var appendsPerSecond, mbPerSecond, syncsPerSecond, syncsPerGroup, syncMsPerGroup, cpuPer1000, p50, p99: Double }

/// Steady state: before each group the router reads the next `group` deliveries of each destination;
/// the group appends `group` batches and completes those deliveries.
func measure(_ kind: String, dests: Int, group: Int) throws -> Run {
    let dir = root + "/run-" + kind
    let store = try openStore(kind, dir)
    defer { try? store.close(); try? FileManager.default.removeItem(atPath: dir) }
    let destinations = (0..<dests).map { "kafka-\($0)" }
    for _ in 0..<(backlog / 64) { _ = try store.commit(payloads: payloads[...], destinations: destinations, completions: []) }
    var (cursors, latencies, appends) = ([Int64](repeating: 0, count: dests), [Double](), 0)
    let (sync0, cpu0, start) = (syncTotals(), cpuSeconds(), monotonic())
    while monotonic() - start < seconds {
        var completions: [Int64] = []
        for (i, d) in destinations.enumerated() {
            let waiting = try store.pending(d, after: cursors[i], limit: group)
            completions += waiting.map(\.id)
            cursors[i] = waiting.last?.id ?? cursors[i]
        }
        let t0 = monotonic()
        _ = try store.commit(payloads: payloads[(appends % 64)..<(appends % 64 + group)], destinations: destinations, completions: completions)
        latencies.append(monotonic() - t0)
        appends += group
    }
    let (wall, cpu, sync1, n) = (monotonic() - start, cpuSeconds() - cpu0, syncTotals(), Double(latencies.count))
    if store.liveBatches != backlog { throw BenchError("\(kind): \(store.liveBatches) batches held, expected \(backlog)") }
    latencies.sort()
    return Run(appendsPerSecond: Double(appends) / wall, mbPerSecond: Double(appends * payloadBytes) / wall / 1e6,
               syncsPerSecond: Double(sync1.calls - sync0.calls) / wall, syncsPerGroup: Double(sync1.calls - sync0.calls) / n,
               syncMsPerGroup: (sync1.seconds - sync0.seconds) * 1000 / n, cpuPer1000: cpu / Double(appends) * 1000,
               p50: percentile(latencies, 0.5) * 1000, p99: percentile(latencies, 0.99) * 1000)
}

/// The disk alone: pwrite + fdatasync, in place or appending (then ext4 also journals the new size).
func baseline(_ label: String, bytes: Int, append: Bool) throws {
    let file = root + "/baseline.dat"
    let fd = open(file, O_RDWR | O_CREAT | O_TRUNC, 0o600)
    try check(fd, "open baseline")
    defer { close(fd); unlink(file) }
    let block = [UInt8](repeating: 0x5A, count: bytes)
    try block.withUnsafeBytes { try writeAll(fd, $0, at: 0) }  // in place: the blocks exist before timing
    var (latencies, offset, start) = ([Double](), append ? bytes : 0, monotonic())
    while monotonic() - start < min(seconds, 3) {
        let t0 = monotonic()
        try block.withUnsafeBytes { try writeAll(fd, $0, at: offset) }
        try check(fdatasync(fd), "fdatasync")
        latencies.append(monotonic() - t0)
        offset += append ? bytes : 0
    }
    let rate = Double(latencies.count) / (monotonic() - start)
    latencies.sort()
    print(String(format: "| %@ | %.0f | %.2f | %.2f |", label, rate, percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000))
}

/// Open time with `recoveryRecords` batches held (1 destination), page cache warm, then cold. The log
/// gets a torn record at its tail first (claims 20 KB, has 1 KB), which opening must cut off.
func recovery(_ kind: String) throws {
    let dir = root + "/recovery-" + kind
    defer { try? FileManager.default.removeItem(atPath: dir) }
    var store = try openStore(kind, dir)
    let t0 = monotonic()
    for n in stride(from: 0, to: recoveryRecords, by: 64) {
        _ = try store.commit(payloads: payloads[0..<min(64, recoveryRecords - n)], destinations: ["kafka-0"], completions: [])
    }
    let fill = monotonic() - t0
    try store.close()
    if kind == "log", let last = try FileManager.default.contentsOfDirectory(atPath: dir).max() {
        let fd = open(dir + "/" + last, O_WRONLY | O_APPEND)
        _ = ([0x20, 0x50, 0, 0, 1, 2, 3, 4] + [UInt8](repeating: 7, count: 1000)).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }
    var times: [Double] = []
    for cold in [false, true] {
        if cold { evictFromPageCache(dir) }
        let t = monotonic()
        store = try openStore(kind, dir)
        times.append(monotonic() - t)
        if store.liveBatches != recoveryRecords { throw BenchError("\(kind) recovered \(store.liveBatches) of \(recoveryRecords)") }
        if let log = store as? LogStore, !cold, log.recoveredTornBytes != 1008 { throw BenchError("torn tail not cut") }
        try store.close()
    }
    let bytes = try FileManager.default.contentsOfDirectory(atPath: dir)
        .reduce(0) { $0 + ((try FileManager.default.attributesOfItem(atPath: dir + "/" + $1))[.size] as! Int) }
    print(String(format: "| %@ | %d | %.0f | %.1f | %.2f | %.2f |", kind, recoveryRecords, Double(bytes) / 1e6, fill, times[0], times[1]))
}

print("spool-bench: \(root) (\(fileSystemName(root))), \(payloadBytes)-byte batches, \(seconds) s per run, \(reps) repetitions")
for kind in stores where kind.hasPrefix("sqlite") {
    let store = try openStore(kind, root + "/probe-" + kind) as! SQLiteStore
    print("\(kind): PRAGMA synchronous on the writer connection = \(store.writerSynchronous) (1 NORMAL, 2 FULL)")
    try store.close()
}
let crcInput = [UInt8](repeating: 0xA5, count: 64 << 20), crcStart = monotonic()
let crcValue = crcInput.withUnsafeBytes(crc32c)
print(String(format: "crc32c in software: %.2f GB/s (%08x)", Double(crcInput.count) / 1e9 / (monotonic() - crcStart), crcValue))
print("\nThe disk alone: pwrite + fdatasync\n\n| write | ops/s | p50 ms | p99 ms |\n|---|---|---|---|")
try baseline("4 KB in place", bytes: 4096, append: false)
try baseline("20 KB appended", bytes: payloadBytes, append: true)
try baseline("64 × 20 KB appended", bytes: 64 * payloadBytes, append: true)

var results: [String: [Run]] = [:]
for rep in 1...reps { for dests in destCounts { for group in groups { for kind in stores {
    let run = try measure(kind, dests: dests, group: group)
    results["\(kind)/\(dests)/\(group)", default: []].append(run)
    FileHandle.standardError.write(String(format: "rep %d %@ dests=%d group=%d: %.0f appends/s\n", rep, kind, dests, group, run.appendsPerSecond).data(using: .utf8)!)
} } } }
print("\nGroup commits: median of \(reps) runs by appends/s [range]; CPU = user+sys of the process; latency = one group commit\n")
print("| store | dests | group | appends/s | MB/s | fsyncs/s | fsyncs/group | fsync ms/group | CPU s/1000 appends | p50 ms | p99 ms |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for dests in destCounts { for group in groups { for kind in stores {
    let runs = results["\(kind)/\(dests)/\(group)"]!.sorted { $0.appendsPerSecond < $1.appendsPerSecond }
    let m = runs[runs.count / 2]
    print(String(format: "| %@ | %d | %d | %.0f [%.0f–%.0f] | %.1f | %.0f | %.2f | %.2f | %.3f | %.2f | %.2f |", kind, dests, group,
                 m.appendsPerSecond, runs.first!.appendsPerSecond, runs.last!.appendsPerSecond, m.mbPerSecond, m.syncsPerSecond,
                 m.syncsPerGroup, m.syncMsPerGroup, m.cpuPer1000, m.p50, m.p99))
} } }
if recoveryRecords > 0 {
    print("\nOpening with \(recoveryRecords) batches held (1 destination)\n")
    print("| store | batches | MB on disk | fill s (groups of 64) | open s, warm cache | open s, cold cache |\n|---|---|---|---|---|---|")
    for kind in ["sqlite-full", "log"] { try recovery(kind) }
}
if options["dir"] == nil { try? FileManager.default.removeItem(atPath: root) }
