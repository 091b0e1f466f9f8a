import Foundation
import Shared

/// HTTP Basic auth against the tenants' API credentials. Secrets are compared in constant time.
struct Authenticator: Sendable {
    private let byKey: [String: (tenant: String, secret: [UInt8])]

    init(tenants: [Tenant]) {
        var map: [String: (tenant: String, secret: [UInt8])] = [:]
        for t in tenants { map[t.apiKey] = (t.id, Array(t.apiSecret.value.utf8)) }
        byKey = map
    }

    /// The tenant id for an `Authorization` header value.
    func tenant(authorization: String?) throws(APIError) -> String {
        guard let authorization, !authorization.isEmpty else { throw .missingCredentials }
        let parts = authorization.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "basic",
            let data = Data(base64Encoded: String(parts[1]).trimmingCharacters(in: .whitespaces))
        else { throw .malformedCredentials }
        let bytes = [UInt8](data)
        guard let colon = bytes.firstIndex(of: UInt8(ascii: ":")) else { throw .malformedCredentials }
        let key = String(decoding: bytes[..<colon], as: UTF8.self)
        let secret = Array(bytes[(colon + 1)...])
        // Unknown keys still pay for a comparison, so timing tells nothing about which keys exist.
        let entry = byKey[key]
        let matches = Self.constantTimeEquals(secret, entry?.secret ?? Self.decoy)
        guard let entry, matches else { throw .invalidCredentials }
        return entry.tenant
    }

    private static let decoy = [UInt8](repeating: 0x5A, count: 32)

    static func constantTimeEquals(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        var diff = UInt8(truncatingIfNeeded: a.count ^ b.count)
        let n = max(a.count, b.count)
        for i in 0..<n {
            let x = i < a.count ? a[i] : 0
            let y = i < b.count ? b[i] : 0
            diff |= x ^ y
        }
        return diff == 0
    }
}
