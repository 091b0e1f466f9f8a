import Foundation
import Glibc

// Every fsync/fdatasync of the process is counted, SQLite's too: libsqlite3 calls fdatasync through
// the dynamic linker, and these definitions (exported, see Package.swift) take libc's place.
private typealias SyncFunction = @convention(c) (Int32) -> Int32
private let libcFdatasync = unsafeBitCast(dlsym(UnsafeMutableRawPointer(bitPattern: -1), "fdatasync")!, to: SyncFunction.self)
private let libcFsync = unsafeBitCast(dlsym(UnsafeMutableRawPointer(bitPattern: -1), "fsync")!, to: SyncFunction.self)
private let syncLock = NSLock()
nonisolated(unsafe) private var syncs = (calls: 0, seconds: 0.0)
func syncTotals() -> (calls: Int, seconds: Double) { syncLock.withLock { syncs } }
private func counted(_ call: () -> Int32) -> Int32 {
    let start = monotonic()
    defer { let spent = monotonic() - start; syncLock.withLock { syncs.calls += 1; syncs.seconds += spent } }
    return call()
}
@_cdecl("fdatasync") public func countedFdatasync(_ fd: Int32) -> Int32 { counted { libcFdatasync(fd) } }
@_cdecl("fsync") public func countedFsync(_ fd: Int32) -> Int32 { counted { libcFsync(fd) } }

func monotonic() -> Double { var t = timespec(); clock_gettime(CLOCK_MONOTONIC, &t); return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9 }

/// User + system CPU seconds of the process, all threads (GRDB's writer queue included).
func cpuSeconds() -> Double {
    var u = rusage()
    getrusage(RUSAGE_SELF.rawValue, &u)
    return Double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + Double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6
}

func percentile(_ sorted: [Double], _ p: Double) -> Double { sorted.isEmpty ? .nan : sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))] }

// CRC32C (Castagnoli), slice-by-8 in software; SSE4.2's crc32 instruction would be several times faster.
private let crcTable: [UInt32] = {
    var t = [UInt32](repeating: 0, count: 8 * 256)
    for i in 0..<256 { t[i] = (0..<8).reduce(UInt32(i)) { c, _ in c & 1 != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 } }
    for i in 256..<2048 { let p = t[i - 256]; t[i] = (p >> 8) ^ t[Int(p & 0xFF)] }
    return t
}()

func crc32c(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
    crcTable.withUnsafeBufferPointer { t in
        var (crc, i, n): (UInt32, Int, Int) = (~0, 0, bytes.count)
        while i + 8 <= n {
            let lo = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: i, as: UInt32.self)) ^ crc
            let hi = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: i + 4, as: UInt32.self))
            crc = t[1792 + Int(lo & 0xFF)] ^ t[1536 + Int((lo >> 8) & 0xFF)] ^ t[1280 + Int((lo >> 16) & 0xFF)] ^ t[1024 + Int(lo >> 24)]
                ^ t[768 + Int(hi & 0xFF)] ^ t[512 + Int((hi >> 8) & 0xFF)] ^ t[256 + Int((hi >> 16) & 0xFF)] ^ t[Int(hi >> 24)]
            i += 8
        }
        while i < n { crc = t[Int((crc ^ UInt32(bytes[i])) & 0xFF)] ^ (crc >> 8); i += 1 }
        return ~crc
    }
}

struct BenchError: Error, CustomStringConvertible { var description: String; init(_ d: String) { description = d } }

func check(_ rc: some BinaryInteger, _ what: @autoclosure () -> String) throws {
    if rc < 0 { throw BenchError("\(what()): \(String(cString: strerror(errno)))") }
}

func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, at offset: Int) throws {
    var done = 0
    while done < bytes.count {
        let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
        try check(n, "pwrite")
        done += n
    }
}

/// Drops a directory's files from the page cache (after a sync), for cold-open timings.
func evictFromPageCache(_ dir: String) {
    sync()
    for name in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] {
        let fd = open(dir + "/" + name, O_RDONLY)
        if fd >= 0 { posix_fadvise(fd, 0, 0, Int32(POSIX_FADV_DONTNEED)); close(fd) }
    }
}

/// "ext4 on /dev/vda": the mount of /proc/mounts with the longest mount point above `path`.
func fileSystemName(_ path: String) -> String {
    let mounts = ((try? String(contentsOfFile: "/proc/mounts", encoding: .utf8)) ?? "").split(separator: "\n")
        .map { $0.split(separator: " ").map(String.init) }.filter { $0.count > 2 && (path + "/").hasPrefix($0[1] == "/" ? "/" : $0[1] + "/") }
    guard let m = mounts.max(by: { $0[1].count < $1[1].count }) else { return "?" }
    return "\(m[2]) on \(m[0])"
}
