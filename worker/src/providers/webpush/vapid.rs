//! VAPID (RFC 8292): the application server proves to each push service that its pushes come
//! from the key the subscription was made for, with an ES256 JWT whose audience is the push
//! service's origin. One token per origin is signed and reused for hours, not one per push.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use pushfleet_core::webpush::encode_base64url;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls_pemfile::Item;
use serde::Serialize;

use crate::providers::error::{read_file, ProviderError};

/// How long a signed token is valid; RFC 8292 allows at most 24 hours.
const TOKEN_LIFETIME_SECS: u64 = 12 * 3600;
/// A token with less than this left is replaced, so none expires on its way.
const RENEW_BEFORE_SECS: u64 = 3600;

/// The application server's VAPID key and the tokens signed with it, per origin.
pub struct Vapid {
    key: EcdsaKeyPair,
    /// `k=`: the public key, uncompressed, base64url.
    public_key: String,
    subject: String,
    rng: SystemRandom,
    tokens: Mutex<HashMap<String, Signed>>,
}

#[derive(Clone)]
struct Signed {
    header: String,
    expires_at: u64,
}

#[derive(Serialize)]
struct Claims<'a> {
    aud: &'a str,
    exp: u64,
    sub: &'a str,
}

impl Vapid {
    /// Reads a PKCS#8 P-256 private key (PEM).
    pub fn load(path: &Path, subject: &str) -> Result<Vapid, ProviderError> {
        let pem = read_file(path)?;
        let der = match rustls_pemfile::read_one(&mut &pem[..]) {
            Ok(Some(Item::Pkcs8Key(der))) => der,
            Ok(Some(Item::Sec1Key(_))) => {
                return Err(ProviderError::bad_file(
                    path,
                    "not a PKCS#8 key (BEGIN PRIVATE KEY): convert it with openssl pkcs8 -topk8 -nocrypt",
                ))
            }
            Ok(_) => return Err(ProviderError::bad_file(path, "no PEM private key")),
            Err(e) => {
                return Err(ProviderError::bad_file(
                    path,
                    format!("no PEM private key: {e}"),
                ))
            }
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            der.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| ProviderError::bad_file(path, format!("not a P-256 private key: {e}")))?;
        Ok(Vapid {
            public_key: encode_base64url(key.public_key().as_ref()),
            key,
            subject: subject.to_string(),
            rng,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// The public key as subscriptions are made for it (`applicationServerKey`).
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// The `Authorization` value for a push to `origin` (`https://host[:port]`) at `now_secs`.
    pub fn authorization(&self, origin: &str, now_secs: u64) -> String {
        let mut tokens = self.tokens.lock().expect("VAPID token cache");
        if let Some(signed) = tokens.get(origin) {
            if signed.expires_at > now_secs + RENEW_BEFORE_SECS {
                return signed.header.clone();
            }
        }
        let expires_at = now_secs + TOKEN_LIFETIME_SECS;
        let header = format!(
            "vapid t={}, k={}",
            self.sign(origin, expires_at),
            self.public_key
        );
        metrics::counter!("pushfleet_webpush_vapid_tokens_signed_total").increment(1);
        // Endpoints of one app live on a handful of push services; a bound keeps a stream of
        // odd origins from growing the cache.
        if tokens.len() >= 1024 {
            tokens.retain(|_, signed| signed.expires_at > now_secs + RENEW_BEFORE_SECS);
        }
        tokens.insert(
            origin.to_string(),
            Signed {
                header: header.clone(),
                expires_at,
            },
        );
        header
    }

    fn sign(&self, audience: &str, expires_at: u64) -> String {
        let header = encode_base64url(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = serde_json::to_vec(&Claims {
            aud: audience,
            exp: expires_at,
            sub: &self.subject,
        })
        .expect("claims of strings and numbers encode");
        let input = format!("{header}.{}", encode_base64url(&claims));
        let signature = self
            .key
            .sign(&self.rng, input.as_bytes())
            .expect("ECDSA signing with the system's randomness");
        format!("{input}.{}", encode_base64url(signature.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushfleet_core::webpush::decode_base64url;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    fn vapid() -> Vapid {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let path = std::env::temp_dir().join(format!("vapid-{}.pem", uuid::Uuid::new_v4()));
        let body = base64_lines(pkcs8.as_ref());
        std::fs::write(
            &path,
            format!("-----BEGIN PRIVATE KEY-----\n{body}-----END PRIVATE KEY-----\n"),
        )
        .unwrap();
        let vapid = Vapid::load(&path, "mailto:ops@example.org").unwrap();
        std::fs::remove_file(path).unwrap();
        vapid
    }

    fn base64_lines(der: &[u8]) -> String {
        use base64::Engine;
        let text = base64::engine::general_purpose::STANDARD.encode(der);
        text.as_bytes()
            .chunks(64)
            .map(|line| format!("{}\n", std::str::from_utf8(line).unwrap()))
            .collect()
    }

    #[test]
    fn tokens_verify_and_are_reused_per_origin() {
        let vapid = vapid();
        let now = 1_800_000_000;
        let first = vapid.authorization("https://push.example.org", now);
        assert_eq!(
            first,
            vapid.authorization("https://push.example.org", now + 60)
        );
        assert_ne!(first, vapid.authorization("https://other.example.org", now));
        // Renewed once less than an hour is left.
        assert_ne!(
            first,
            vapid.authorization("https://push.example.org", now + TOKEN_LIFETIME_SECS - 1800)
        );

        let (t, k) = first
            .strip_prefix("vapid t=")
            .and_then(|rest| rest.split_once(", k="))
            .unwrap();
        assert_eq!(k, vapid.public_key());
        let (input, signature) = t.rsplit_once('.').unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, decode_base64url(k).unwrap())
            .verify(input.as_bytes(), &decode_base64url(signature).unwrap())
            .expect("the signature verifies with k");
        let claims: serde_json::Value =
            serde_json::from_slice(&decode_base64url(input.split('.').nth(1).unwrap()).unwrap())
                .unwrap();
        assert_eq!(claims["aud"], "https://push.example.org");
        assert_eq!(claims["sub"], "mailto:ops@example.org");
        assert_eq!(claims["exp"], now + TOKEN_LIFETIME_SECS);
    }

    #[test]
    fn a_sec1_key_is_refused_with_a_hint() {
        let path = std::env::temp_dir().join(format!("vapid-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(
            &path,
            "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIG1vZGVsIGtleSBmb3IgYSB0ZXN0IG9ubHkgMTIzNDU2Nzg5MDEyoAoGCCqGSM49\nAwEHoUQDQgAE\n-----END EC PRIVATE KEY-----\n",
        )
        .unwrap();
        let error = Vapid::load(&path, "mailto:ops@example.org").err().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(error.to_string().contains("PKCS#8"), "{error}");
    }
}
