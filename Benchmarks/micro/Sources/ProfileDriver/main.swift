// A plain loop over one operation, for valgrind --tool=callgrind (see README.md):
//   ProfileDriver OPERATION INPUT ITERATIONS     e.g. ProfileDriver apply large 200
//   ProfileDriver check                          Foundation counterparts produce the same documents
//   ProfileDriver info                           input sizes
import Foundation
import MicroSupport

let args = CommandLine.arguments
switch args.count > 1 ? args[1] : "" {
case "check":
    do {
        for line in try Checks.run() { print(line) }
    } catch {
        print("MISMATCH: \(error)")
        exit(1)
    }
case "info":
    for name in ["large", "small"] {
        print("\(name): \(Inputs.named(name).readableBytes) bytes, \(Inputs.eventCount(Inputs.named(name))) events")
    }
case let name where Operation.names.contains(name):
    let input = args.count > 2 ? args[2] : "large"
    let iterations = args.count > 3 ? Int(args[3])! : 1000
    let op = Operation.make(name, input: input)
    var sink = 0
    let start = ContinuousClock.now
    for _ in 0..<iterations { sink &+= op.run() }
    let elapsed = ContinuousClock.now - start
    let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    print(
        "\(name) \(input): \(iterations) runs in \(String(format: "%.3f", seconds)) s: \(String(format: "%.0f", Double(iterations) / seconds)) ops/s, "
            + "\(String(format: "%.1f", Double(op.bytes * iterations) / seconds / 1e6)) MB/s (sink \(sink))")
default:
    print("usage: ProfileDriver check | info | OPERATION [large|small] [ITERATIONS]\noperations: \(Operation.names.joined(separator: " "))")
    exit(2)
}
