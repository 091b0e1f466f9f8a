import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// glibc's malloc, tuned once at the start of every Sluice process.
public enum MallocTuning {
    /// At most this many malloc arenas (glibc's default: 8 per core). A thread that allocates
    /// while another holds an arena gets one of its own, and what is freed stays in the arena it
    /// came from: with request bodies allocated on the loop and freed on the spool's and
    /// Dispatch's threads, ingest's peak RSS at max load was 69–77 MB with the default and
    /// 55–70 MB with 2, kafka-out's 61–62 and 56–58 MB (docs/BENCHMARKS.md, session 15), with no
    /// difference in throughput. An operator's `MALLOC_ARENA_MAX` wins.
    public static let arenaMax: Int32 = 2

    /// Applies the tuning; call before the process starts its threads.
    public static func apply() {
        #if canImport(Glibc)
        guard ProcessInfo.processInfo.environment["MALLOC_ARENA_MAX"] == nil else { return }
        // <malloc.h> is not in Swift's Glibc module: glibc's mallopt, looked up by name.
        typealias Mallopt = @convention(c) (Int32, Int32) -> Int32
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallopt") else { return }
        let mArenaMax: Int32 = -8  // M_ARENA_MAX
        _ = unsafeBitCast(symbol, to: Mallopt.self)(mArenaMax, arenaMax)
        #endif
    }
}
