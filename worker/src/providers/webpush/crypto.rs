//! RFC 8291 message encryption for WebPush: an ephemeral P-256 key agreed with the
//! subscription's key, HKDF-SHA-256 keyed by its authentication secret, and one `aes128gcm`
//! record (RFC 8188) holding the whole payload.

use pushfleet_core::webpush::DecodedKeys;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, ECDH_P256};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

/// The record size announced in the header: one record of a payload a push service accepts.
const RECORD_SIZE: u32 = 4096;

/// Why a payload could not be encrypted: a key that passed ingest's check but not the
/// agreement, or a system without randomness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("the subscription's p256dh key is not a P-256 point")]
    BadSubscriptionKey,
    #[error("no randomness for the message key")]
    Random,
}

/// The `aes128gcm` body for `plaintext`: header (salt, record size, the ephemeral public key)
/// and the sealed record.
pub fn encrypt(plaintext: &[u8], subscription: &DecodedKeys) -> Result<Vec<u8>, CryptoError> {
    let rng = SystemRandom::new();
    let mut salt = [0u8; 16];
    rng.fill(&mut salt).map_err(|_| CryptoError::Random)?;
    let ephemeral =
        EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(|_| CryptoError::Random)?;
    let public = ephemeral
        .compute_public_key()
        .map_err(|_| CryptoError::Random)?;
    let as_public: [u8; 65] = public
        .as_ref()
        .try_into()
        .map_err(|_| CryptoError::Random)?;
    let peer = UnparsedPublicKey::new(&ECDH_P256, &subscription.p256dh[..]);
    let secret = agree_ephemeral(ephemeral, &peer, |shared| {
        let mut secret = [0u8; 32];
        secret.copy_from_slice(shared);
        secret
    })
    .map_err(|_| CryptoError::BadSubscriptionKey)?;
    Ok(seal(plaintext, &secret, subscription, &as_public, &salt))
}

/// The deterministic part of [`encrypt`], from the agreed secret on.
fn seal(
    plaintext: &[u8],
    ecdh_secret: &[u8; 32],
    subscription: &DecodedKeys,
    as_public: &[u8; 65],
    salt: &[u8; 16],
) -> Vec<u8> {
    let mut ikm = [0u8; 32];
    hkdf_sha256(
        &subscription.auth,
        ecdh_secret,
        &[b"WebPush: info\0", &subscription.p256dh, as_public],
        &mut ikm,
    );
    let mut cek = [0u8; 16];
    hkdf_sha256(salt, &ikm, &[b"Content-Encoding: aes128gcm\0"], &mut cek);
    let mut nonce = [0u8; 12];
    hkdf_sha256(salt, &ikm, &[b"Content-Encoding: nonce\0"], &mut nonce);

    let mut body = Vec::with_capacity(86 + plaintext.len() + 1 + 16);
    body.extend_from_slice(salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(as_public.len() as u8);
    body.extend_from_slice(as_public);
    let mut record = Vec::with_capacity(plaintext.len() + 1 + 16);
    record.extend_from_slice(plaintext);
    // The last (and only) record's padding delimiter.
    record.push(2);
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &cek).expect("a 16-byte key"));
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::empty(),
        &mut record,
    )
    .expect("a record far below AES-GCM's limit");
    body.extend_from_slice(&record);
    body
}

/// An output length for ring's HKDF.
struct Length(usize);

impl hkdf::KeyType for Length {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[&[u8]], out: &mut [u8]) {
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(info, Length(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("at most 32 bytes of output");
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushfleet_core::webpush::{decode_base64url, encode_base64url};

    fn b64<const N: usize>(text: &str) -> [u8; N] {
        decode_base64url(text)
            .expect("base64url")
            .try_into()
            .expect("length")
    }

    /// RFC 8291 appendix A, from its ECDH secret on: the body must match byte for byte.
    #[test]
    fn the_rfc_example_encrypts_to_the_published_body() {
        let subscription = DecodedKeys {
            p256dh: b64("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"),
            auth: b64("BTBZMqHH6r4Tts7J_aSIgg"),
        };
        let body = seal(
            b"When I grow up, I want to be a watermelon",
            &b64("kyrL1jIIOHEzg3sM2ZWRHDRB62YACZhhSlknJ672kSs"),
            &subscription,
            &b64("BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8"),
            &b64("DGv6ra1nlYgDCS1FRnbzlw"),
        );
        assert_eq!(
            encode_base64url(&body),
            "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
        );
    }

    #[test]
    fn each_message_has_its_own_salt_and_key() {
        let subscription = DecodedKeys {
            p256dh: b64("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"),
            auth: b64("BTBZMqHH6r4Tts7J_aSIgg"),
        };
        let a = encrypt(b"{}", &subscription).unwrap();
        let b = encrypt(b"{}", &subscription).unwrap();
        assert_eq!(a.len(), 86 + 2 + 1 + 16);
        assert_ne!(a[..16], b[..16]);
        assert_ne!(a[21..86], b[21..86]);
        assert_eq!(&a[16..21], &[0, 0, 16, 0, 65]);
        let mut bad = subscription;
        bad.p256dh = [4; 65];
        assert_eq!(encrypt(b"{}", &bad), Err(CryptoError::BadSubscriptionKey));
    }
}
