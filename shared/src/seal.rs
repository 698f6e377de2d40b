//! Sealing of Secret contents carried inside jobs.
//!
//! The job stream must never store plaintext secrets. Controllers seal each secret with XChaCha20-Poly1305
//! under a key shared with the executors; the associated data binds the sealed value to the machine it is for,
//! so a sealed value copied into another machine's job does not open.

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Sealing failures. None of them carries secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The key file could not be read or has the wrong shape.
    #[error("seal key {path}: {reason}")]
    Key { path: String, reason: String },
    /// The sealed value was made with another key.
    #[error(
        "sealed with key {sealed_with}, but this process holds key {have}; give controllers and executors the same --seal-key-file"
    )]
    WrongKey { sealed_with: String, have: String },
    /// Authentication failed: the value was altered, or is bound to another machine.
    #[error("sealed value failed authentication (tampered, or sealed for another machine)")]
    Tampered,
    /// The sealed value is not valid base64 or has the wrong length.
    #[error("sealed value is malformed: {0}")]
    Malformed(&'static str),
}

/// A sealed secret as it travels in a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sealed {
    /// Identifier of the key (first 8 bytes of SHA-256 of the key, hex), to report key mismatches clearly.
    pub key_id: String,
    /// 24-byte nonce, base64.
    pub nonce: String,
    /// Ciphertext with tag, base64.
    pub ciphertext: String,
}

/// A symmetric sealing key.
#[derive(Clone)]
pub struct SealKey {
    cipher: XChaCha20Poly1305,
    id: String,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKey").field("id", &self.id).finish_non_exhaustive()
    }
}

impl SealKey {
    /// Builds a key from 32 raw bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        let digest = Sha256::digest(bytes);
        let id = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        SealKey { cipher: XChaCha20Poly1305::new(bytes.into()), id }
    }

    /// Loads a key file holding 32 bytes as base64 text (what [`SealKey::generate`] writes) or raw.
    pub fn from_file(path: &std::path::Path) -> Result<Self, SealError> {
        let err = |reason: String| SealError::Key { path: path.display().to_string(), reason };
        let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        Self::from_key_material(&data).map_err(err)
    }

    /// Parses key material: base64 text of 32 bytes, or 32 raw bytes.
    pub fn from_key_material(data: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(data).map(str::trim).unwrap_or_default();
        if let Ok(decoded) = B64.decode(text)
            && let Ok(bytes) = <[u8; 32]>::try_from(decoded.as_slice())
        {
            return Ok(Self::from_bytes(&bytes));
        }
        match <[u8; 32]>::try_from(data) {
            Ok(bytes) => Ok(Self::from_bytes(&bytes)),
            Err(_) => Err("expected 32 bytes, base64-encoded (generate with `head -c32 /dev/urandom | base64`)".into()),
        }
    }

    /// A fresh random key as base64 text, suitable for a key file.
    pub fn generate() -> String {
        B64.encode(XChaCha20Poly1305::generate_key(&mut OsRng))
    }

    /// Key identifier (not secret).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `plaintext`, bound to `context` (e.g. `cluster/namespace/machine/path`).
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Result<Sealed, SealError> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher
            .encrypt(&nonce, Payload { msg: plaintext, aad: context.as_bytes() })
            .map_err(|_| SealError::Malformed("plaintext too large"))?;
        Ok(Sealed { key_id: self.id.clone(), nonce: B64.encode(nonce), ciphertext: B64.encode(ciphertext) })
    }

    /// Opens a sealed value; `context` must be the one it was sealed with.
    pub fn unseal(&self, sealed: &Sealed, context: &str) -> Result<Vec<u8>, SealError> {
        if sealed.key_id != self.id {
            return Err(SealError::WrongKey { sealed_with: sealed.key_id.clone(), have: self.id.clone() });
        }
        let nonce = B64.decode(&sealed.nonce).map_err(|_| SealError::Malformed("nonce is not base64"))?;
        if nonce.len() != 24 {
            return Err(SealError::Malformed("nonce must be 24 bytes"));
        }
        let ciphertext =
            B64.decode(&sealed.ciphertext).map_err(|_| SealError::Malformed("ciphertext is not base64"))?;
        self.cipher
            .decrypt(XNonce::from_slice(&nonce), Payload { msg: &ciphertext, aad: context.as_bytes() })
            .map_err(|_| SealError::Tampered)
    }
}
