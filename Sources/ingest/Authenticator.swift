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

    /// The tenant id for an `Authorization` header value (`Basic <base64 of key:secret>`; the
    /// scheme in any case). Parsed on its bytes: this runs for every request.
    func tenant(authorization: String?) throws(APIError) -> String {
        guard var authorization, !authorization.isEmpty else { throw .missingCredentials }
        let decoded: [UInt8]? = authorization.withUTF8 { header in
            guard let space = header.firstIndex(of: UInt8(ascii: " ")), space == 5,
                zip(header[..<space], "basic".utf8).allSatisfy({ $0 | 0x20 == $1 })
            else { return nil }
            let token = HTTPToken.trimmed(header[(space + 1)...])
            return Data(base64Encoded: String(decoding: token, as: UTF8.self)).map { [UInt8]($0) }
        }
        guard let bytes = decoded, let colon = bytes.firstIndex(of: UInt8(ascii: ":")) else { throw .malformedCredentials }
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
