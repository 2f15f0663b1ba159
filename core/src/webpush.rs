//! What a WebPush/UnifiedPush endpoint and its subscription keys must be, checked by ingest when
//! a device registers or a push names an endpoint, and by the worker again before it connects.
//!
//! An endpoint URL comes from a client, so without these rules anyone able to register a device
//! could make the worker POST to internal services (SSRF): only `https://` URLs of at most
//! [`MAX_ENDPOINT_BYTES`], whose host resolves to public addresses only, unless the app lists
//! the host in `allowed_endpoint_hosts`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use url::Url;

use crate::config::WebPushSettings;
use crate::job::WebPushKeys;

/// The UnifiedPush and RFC 8030 bound on an endpoint URL.
pub const MAX_ENDPOINT_BYTES: usize = 1000;
/// A push service takes 4096 bytes of RFC 8291 ciphertext: 86 bytes of header, a 16-byte tag
/// and the padding delimiter leave this much cleartext.
pub const MAX_CLEARTEXT_BYTES: usize = 3993;
/// How long a registration waits for the endpoint's host to resolve.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why an endpoint is refused. The texts are shown to API callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("must be at most {MAX_ENDPOINT_BYTES} bytes")]
    TooLong,
    #[error("is not a URL")]
    NotUrl,
    #[error("must be an https:// URL")]
    NotHttps,
    #[error("must not carry a user name or password")]
    Credentials,
    #[error("must name a host")]
    NoHost,
    #[error("host {host} resolves to {address}, which is not a public address")]
    NotPublic { host: String, address: IpAddr },
    #[error("host {host} does not resolve: {problem}")]
    Unresolvable { host: String, problem: String },
}

impl EndpointError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            EndpointError::TooLong => "too_long",
            EndpointError::NotUrl | EndpointError::NoHost | EndpointError::Credentials => {
                "malformed"
            }
            EndpointError::NotHttps => "not_https",
            EndpointError::NotPublic { .. } => "not_public",
            EndpointError::Unresolvable { .. } => "unresolvable",
        }
    }
}

/// The syntactic rules: length, scheme, host, no credentials.
pub fn parse_endpoint(text: &str) -> Result<Url, EndpointError> {
    if text.len() > MAX_ENDPOINT_BYTES {
        return Err(EndpointError::TooLong);
    }
    let url = Url::parse(text).map_err(|_| EndpointError::NotUrl)?;
    if url.scheme() != "https" {
        return Err(EndpointError::NotHttps);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(EndpointError::Credentials);
    }
    match url.host_str() {
        Some(host) if !host.is_empty() => Ok(url),
        _ => Err(EndpointError::NoHost),
    }
}

/// Whether the worker may connect to `address` for an endpoint on an unlisted host: not
/// loopback, private, link-local, shared (CGNAT), multicast, reserved, documentation or
/// unspecified, and no IPv6 form that embeds such an IPv4 address.
pub fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(a: Ipv4Addr) -> bool {
    let [o1, o2, o3, _] = a.octets();
    let blocked = a.is_unspecified()
        || a.is_loopback()
        || a.is_private()
        || a.is_link_local()
        || a.is_multicast()
        || a.is_broadcast()
        || a.is_documentation()
        || o1 == 0
        // Shared address space (CGNAT), 100.64.0.0/10.
        || (o1 == 100 && (o2 & 0xc0) == 64)
        // IETF protocol assignments, 192.0.0.0/24.
        || (o1 == 192 && o2 == 0 && o3 == 0)
        // Benchmarking, 198.18.0.0/15.
        || (o1 == 198 && (o2 & 0xfe) == 18)
        // Reserved, 240.0.0.0/4.
        || o1 >= 240;
    !blocked
}

fn is_public_v6(a: Ipv6Addr) -> bool {
    let segments = a.segments();
    let embedded_v4 = |high: usize| {
        Ipv4Addr::new(
            (segments[high] >> 8) as u8,
            segments[high] as u8,
            (segments[high + 1] >> 8) as u8,
            segments[high + 1] as u8,
        )
    };
    if let Some(v4) = a.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    match segments {
        // Unspecified, loopback and the deprecated IPv4-compatible ::/96.
        [0, 0, 0, 0, 0, 0, _, _] => false,
        // NAT64 64:ff9b::/96: reaches the embedded IPv4 address.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => is_public_v4(embedded_v4(6)),
        // 6to4 2002::/16: the IPv4 address follows the prefix.
        [0x2002, ..] => is_public_v4(embedded_v4(1)),
        // Teredo 2001::/32 tunnels to addresses it hides; documentation 2001:db8::/32.
        [0x2001, 0, ..] | [0x2001, 0xdb8, ..] => false,
        // Discard-only 100::/64.
        [0x100, 0, 0, 0, ..] => false,
        [first, ..] => {
            let unique_local = (first & 0xfe00) == 0xfc00;
            let link_local = (first & 0xffc0) == 0xfe80;
            let site_local = (first & 0xffc0) == 0xfec0;
            let multicast = (first & 0xff00) == 0xff00;
            !(unique_local || link_local || site_local || multicast)
        }
    }
}

/// Checks one address the endpoint's host has, unless the host is listed.
pub fn check_address(
    settings: &WebPushSettings,
    host: &str,
    address: IpAddr,
) -> Result<(), EndpointError> {
    if settings.allows_host(host) || is_public(address) {
        Ok(())
    } else {
        Err(EndpointError::NotPublic {
            host: host.to_string(),
            address,
        })
    }
}

/// The addresses to connect to for `url`'s host, every one of them allowed; an address literal
/// is checked as it is. One non-public address refuses the host: a name that resolves to both
/// is a name someone pointed inwards.
pub async fn resolve_checked(
    settings: &WebPushSettings,
    url: &Url,
) -> Result<Vec<SocketAddr>, EndpointError> {
    let host = url.host_str().ok_or(EndpointError::NoHost)?;
    let port = url.port_or_known_default().unwrap_or(443);
    resolve_host(settings, host, port).await
}

/// [`resolve_checked`] for a host and port.
pub async fn resolve_host(
    settings: &WebPushSettings,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, EndpointError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(address) = bare.parse::<IpAddr>() {
        check_address(settings, host, address)?;
        return Ok(vec![SocketAddr::new(address, port)]);
    }
    let unresolvable = |problem: String| EndpointError::Unresolvable {
        host: host.to_string(),
        problem,
    };
    let addresses: Vec<SocketAddr> =
        tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((bare, port)))
            .await
            .map_err(|_| unresolvable("timed out".into()))?
            .map_err(|e| unresolvable(e.to_string()))?
            .collect();
    if addresses.is_empty() {
        return Err(unresolvable("no address".into()));
    }
    for address in &addresses {
        check_address(settings, host, address.ip())?;
    }
    Ok(addresses)
}

/// Why subscription keys are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("must be given together with {0}")]
    Incomplete(&'static str),
    #[error("is not base64url")]
    NotBase64,
    #[error("must be an uncompressed P-256 public key (65 bytes)")]
    NotP256,
    #[error("must be 16 bytes")]
    AuthLength,
}

/// A subscription's keys, decoded.
pub struct DecodedKeys {
    /// The user agent's P-256 public key, uncompressed.
    pub p256dh: [u8; 65],
    pub auth: [u8; 16],
}

/// base64url with or without padding, as browsers and distributors hand keys out.
pub fn decode_base64url(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD
        .decode(text)
        .or_else(|_| URL_SAFE.decode(text))
        .ok()
}

pub fn encode_base64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes and checks the keys; which of the two is at fault comes with the error.
pub fn decode_keys(keys: &WebPushKeys) -> Result<DecodedKeys, (&'static str, KeyError)> {
    let p256dh: [u8; 65] = decode_base64url(&keys.p256dh)
        .ok_or(("p256dh", KeyError::NotBase64))?
        .try_into()
        .map_err(|_| ("p256dh", KeyError::NotP256))?;
    if p256dh[0] != 4 || !on_curve(&p256dh) {
        return Err(("p256dh", KeyError::NotP256));
    }
    let auth: [u8; 16] = decode_base64url(&keys.auth)
        .ok_or(("auth", KeyError::NotBase64))?
        .try_into()
        .map_err(|_| ("auth", KeyError::AuthLength))?;
    Ok(DecodedKeys { p256dh, auth })
}

/// Whether `point` is a point of P-256: an agreement with a throw-away key validates it.
fn on_curve(point: &[u8; 65]) -> bool {
    use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, ECDH_P256};
    let rng = ring::rand::SystemRandom::new();
    let Ok(mine) = EphemeralPrivateKey::generate(&ECDH_P256, &rng) else {
        return false;
    };
    agree_ephemeral(mine, &UnparsedPublicKey::new(&ECDH_P256, point), |_| ()).is_ok()
}

/// At least the size of the JSON body the worker encrypts for `push`, whatever the app type and
/// event: each field's escaped length as often as a payload can carry it (the caller's URI also
/// stands in for a missing display name; a transfer's file name and type travel inside a JSON
/// string, escaped twice), plus the keys, the event, the session id and the punctuation. Lets
/// ingest refuse a push too large to encrypt before it is queued; the worker checks the exact
/// size again.
pub fn cleartext_bound(push: &crate::job::PushData) -> usize {
    const FIXED: usize = 400;
    fn escaped(text: &str) -> usize {
        serde_json::to_string(text).map_or(6 * text.len() + 2, |s| s.len())
    }
    fn twice_escaped(text: &str) -> usize {
        serde_json::to_string(text)
            .map(|once| escaped(&once))
            .unwrap_or(36 * text.len() + 2)
    }
    let once = [
        Some(push.call_id.as_str()),
        Some(push.to.as_str()),
        push.from_display_name.as_deref(),
        push.media_type.as_deref(),
        push.reason.as_deref(),
        push.account.as_deref(),
        push.content.as_deref(),
        push.content_type.as_deref(),
    ];
    let nested = [push.filename.as_deref(), push.filetype.as_deref()];
    FIXED
        + 2 * escaped(&push.from)
        + once.into_iter().flatten().map(escaped).sum::<usize>()
        + nested
            .into_iter()
            .flatten()
            .map(twice_escaped)
            .sum::<usize>()
}

/// The RFC 8030 `Topic` of a call's pushes: a cancel carries the same one as the ring, so the
/// push service replaces a ring still waiting for the device. 32 base64url characters of the
/// call-id's SHA-256 (the header allows no more, and call-ids are not base64url).
pub fn topic(call_id: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, call_id.as_bytes());
    URL_SAFE_NO_PAD.encode(&digest.as_ref()[..24])
}

/// The help texts of the WebPush metrics, shown on `/metrics` by ingest and the worker.
pub fn describe_metrics() {
    metrics::describe_counter!(
        "pushfleet_webpush_endpoints_refused_total",
        "UnifiedPush endpoints refused and never contacted, by stage (ingest, worker) and reason"
    );
    metrics::describe_counter!(
        "pushfleet_webpush_vapid_tokens_signed_total",
        "VAPID tokens signed for push service origins"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(allowed: &[&str]) -> WebPushSettings {
        WebPushSettings {
            vapid_key_file: "/dev/null".into(),
            vapid_subject: "mailto:ops@example.org".into(),
            allowed_endpoint_hosts: allowed.iter().map(|s| s.to_string()).collect(),
            ca_file: None,
        }
    }

    #[test]
    fn endpoints_must_be_https_and_short() {
        assert!(parse_endpoint("https://push.example.org/up/abc").is_ok());
        assert_eq!(
            parse_endpoint("http://push.example.org/x"),
            Err(EndpointError::NotHttps)
        );
        assert_eq!(
            parse_endpoint("push.example.org"),
            Err(EndpointError::NotUrl)
        );
        assert_eq!(
            parse_endpoint("https://u:p@push.example.org/"),
            Err(EndpointError::Credentials)
        );
        let long = format!("https://push.example.org/{}", "a".repeat(1000));
        assert_eq!(parse_endpoint(&long), Err(EndpointError::TooLong));
    }

    #[test]
    fn non_public_addresses_are_refused() {
        for blocked in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.0.8",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "2001:db8::1",
            "2001::1",
        ] {
            let address: IpAddr = blocked.parse().unwrap();
            assert!(!is_public(address), "{blocked}");
        }
        for public in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn listed_hosts_may_be_internal() {
        let strict = settings(&[]);
        let url = parse_endpoint("https://127.0.0.1:8443/push/1").unwrap();
        assert!(matches!(
            resolve_checked(&strict, &url).await,
            Err(EndpointError::NotPublic { .. })
        ));
        let url = parse_endpoint("https://localhost:8443/push/1").unwrap();
        assert!(matches!(
            resolve_checked(&strict, &url).await,
            Err(EndpointError::NotPublic { .. })
        ));
        let url = parse_endpoint("https://[::1]:8443/push/1").unwrap();
        assert!(matches!(
            resolve_checked(&strict, &url).await,
            Err(EndpointError::NotPublic { .. })
        ));
        let listed = settings(&["127.0.0.1", "::1"]);
        let url = parse_endpoint("https://127.0.0.1:8443/push/1").unwrap();
        assert_eq!(
            resolve_checked(&listed, &url).await.unwrap(),
            vec!["127.0.0.1:8443".parse().unwrap()]
        );
        let url = parse_endpoint("https://[::1]/push/1").unwrap();
        assert_eq!(
            resolve_checked(&listed, &url).await.unwrap(),
            vec!["[::1]:443".parse().unwrap()]
        );
    }

    #[test]
    fn keys_are_checked() {
        // RFC 8291 appendix A: the user agent's public key and authentication secret.
        let good = WebPushKeys {
            p256dh: "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4".into(),
            auth: "BTBZMqHH6r4Tts7J_aSIgg".into(),
        };
        assert!(decode_keys(&good).is_ok());
        let mut bad = good.clone();
        bad.p256dh = encode_base64url(&[4; 65]);
        assert_eq!(decode_keys(&bad).err(), Some(("p256dh", KeyError::NotP256)));
        let mut bad = good.clone();
        bad.auth = "AAAA".into();
        assert_eq!(
            decode_keys(&bad).err(),
            Some(("auth", KeyError::AuthLength))
        );
        let mut bad = good;
        bad.p256dh = "not base64!".into();
        assert_eq!(
            decode_keys(&bad).err(),
            Some(("p256dh", KeyError::NotBase64))
        );
    }

    #[test]
    fn topics_are_short_base64url_and_stable() {
        let t = topic("a84b4c76e66710@pc33.example.com");
        assert_eq!(t.len(), 32);
        assert!(t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(t, topic("a84b4c76e66710@pc33.example.com"));
        assert_ne!(t, topic("another-call"));
    }
}
