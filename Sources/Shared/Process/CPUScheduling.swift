import ArgumentParser
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// The Linux CPU scheduling policy of a Sluice process's threads (`--cpu-scheduling`).
///
/// Unless asked, a process keeps the policy it was started with (`normal` — `SCHED_OTHER` — unless
/// a service manager or `chrt` chose another). `batch` is `SCHED_BATCH`: the same fair share of the
/// CPU, but a thread that wakes up does not preempt the one running — it waits until that one's
/// slice ends or it blocks. Sluice is a pipeline of processes that wake each other for every burst
/// of work (a request, a frame, a delivery report); under `batch` each runs longer on more work
/// per turn. Measured on 2 cores (docs/BENCHMARKS.md, session 21): at max load 8–26% more events
/// delivered at 8–21% less CPU per request — but at half load with batches for one tenant the
/// p99 of ingest's answers rose from 2–8 ms to 9–13 ms: librdkafka's idempotent producer
/// busy-polls at times (a partition with 5 messages in flight and its next batch due), and under
/// `batch` ingest's threads cannot preempt it. Hence opt-in.
public enum CPUScheduling: String, CaseIterable, ExpressibleByArgument, Sendable {
    case batch
    case normal

    /// Linux's numbers for the policies (<sched.h>; not all of them are in Swift's Glibc module).
    private var linuxPolicy: Int32 {
        switch self {
        case .batch: return 3  // SCHED_BATCH
        case .normal: return 0  // SCHED_OTHER
        }
    }

    /// Applies the policy to every thread of the process (threads started later inherit it from
    /// the thread that starts them). Returns a description of what failed, or nil.
    public func apply() -> String? {
        #if os(Linux)
        var param = sched_param()
        param.sched_priority = 0
        var failures: [String] = []
        // Twice: a thread started while the first pass ran inherits the old policy from its creator.
        for _ in 0..<2 {
            let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? ["0"]
            for task in tasks {
                guard let tid = Int32(task) else { continue }
                if sched_setscheduler(tid, linuxPolicy, &param) != 0 && errno != ESRCH {
                    failures.append("thread \(tid): \(String(cString: strerror(errno)))")
                }
            }
        }
        return failures.isEmpty ? nil : "cannot set the \(rawValue) CPU scheduling policy (\(failures.first!))"
        #else
        return nil
        #endif
    }
}
