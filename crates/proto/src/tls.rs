//! Certificates and TLS configurations.
//!
//! One CA per deployment, created by the first controller. It signs the controllers' server
//! certificates and one client certificate per credential: the administrator's, and each
//! enrolled node's. A client is recognised by the SHA-256 fingerprint of its certificate, which
//! the controller looks up in its store; removing that record is revocation, effective on the
//! next request and on open streams at once.
//!
//! A node that has only a join token trusts the controller through the CA fingerprint the token
//! carries ([`Trust::Fingerprint`]), as kubeadm's discovery hash does: the server must present
//! the CA in its chain, the CA must hash to the fingerprint, and the server certificate must
//! verify against it.
//!
//! Keys are ECDSA P-256, generated where they are used: a node sends only its public key.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SignatureAlgorithm,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// A TLS or certificate error, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

fn err(what: &str) -> impl FnOnce(rcgen::Error) -> TlsError + '_ {
    move |e| TlsError(format!("{what}: {e}"))
}

/// The crypto provider every configuration uses (ring: no C toolchain beyond `cc`).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a certificate's DER, as lowercase hex: how credentials and the CA are named.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of arbitrary bytes, as lowercase hex (token secrets are stored only hashed).
pub fn sha256_hex(data: &[u8]) -> String {
    fingerprint(data)
}

/// `n` random bytes from the system's CSPRNG, as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    // ring's SystemRandom fails only without the kernel's getrandom: nothing secure can follow.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system random number generator failed");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A random certificate serial number (16 ASCII hex digits: positive, as X.509 wants).
fn serial() -> rcgen::SerialNumber {
    random_hex(8).into_bytes().into()
}

/// The first certificate in a PEM text, as DER.
pub fn cert_der(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| TlsError(format!("not a PEM certificate: {e}")))
}

/// The deployment's certificate authority.
#[derive(Debug)]
pub struct Ca {
    /// The self-signed CA certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// The CA's subject; issuing needs the same parameters the certificate was made from, so they
/// are built here and nowhere else.
fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err("CA parameters"))?;
    p.distinguished_name.push(DnType::CommonName, "Bulkhead CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2099, 12, 31);
    Ok(p)
}

impl Ca {
    /// A new CA with a new key.
    pub fn generate() -> Result<Ca, TlsError> {
        let key = KeyPair::generate().map_err(err("CA key"))?;
        let cert = ca_params()?
            .self_signed(&key)
            .map_err(err("CA certificate"))?;
        Ca::load(&cert.pem(), &key.serialize_pem())
    }

    /// A CA from its stored certificate and key.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(err("CA key"))?;
        cert_der(cert_pem)?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer: Issuer::new(ca_params()?, key),
        })
    }

    /// The CA certificate's fingerprint, as carried by join tokens.
    pub fn fingerprint(&self) -> Result<String, TlsError> {
        Ok(fingerprint(&cert_der(&self.cert_pem)?))
    }

    /// A server certificate for a controller, valid for `names` (DNS names or IP addresses), and
    /// its new key. Returns (certificate PEM, key PEM).
    pub fn server_cert(&self, names: &[String]) -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(err("server key"))?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err("server params"))?;
        p.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
        p.distinguished_name
            .push(DnType::CommonName, "bulkhead-controller");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.serial_number = Some(serial());
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(err("server cert"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A client certificate for `name` on a public key the client generated (see
    /// [`CredentialKey`]). Returns the certificate PEM.
    pub fn client_cert(
        &self,
        name: &str,
        public_key: &ClientPublicKey,
    ) -> Result<String, TlsError> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err("client params"))?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.serial_number = Some(serial());
        let cert = p
            .signed_by(public_key, &self.issuer)
            .map_err(err("client cert"))?;
        Ok(cert.pem())
    }
}

fn san(name: &str) -> Result<SanType, TlsError> {
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => Ok(SanType::DnsName(
            name.to_string()
                .try_into()
                .map_err(|e| TlsError(format!("{name:?}: {e}")))?,
        )),
    }
}

/// A client's credential key pair, generated where it is used.
#[derive(Debug)]
pub struct CredentialKey {
    key: KeyPair,
}

impl CredentialKey {
    /// A new key pair.
    pub fn generate() -> Result<CredentialKey, TlsError> {
        Ok(CredentialKey {
            key: KeyPair::generate().map_err(err("credential key"))?,
        })
    }

    /// The private key, PEM, to keep (mode 0600).
    pub fn pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The public half, the only part that leaves the machine.
    pub fn public(&self) -> ClientPublicKey {
        ClientPublicKey {
            raw: self.key.public_key_raw().to_vec(),
        }
    }
}

/// A P-256 public key (uncompressed point) a client sends to be certified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPublicKey {
    raw: Vec<u8>,
}

impl ClientPublicKey {
    /// Base64 of the raw point, as it travels.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.raw)
    }

    /// Parses a key sent by a client: 65 bytes, an uncompressed P-256 point. A point off the
    /// curve yields a certificate nobody can use, which harms only the sender.
    pub fn from_base64(s: &str) -> Result<ClientPublicKey, TlsError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| TlsError(format!("credential key: {e}")))?;
        if raw.len() != 65 || raw[0] != 4 {
            return Err(TlsError(
                "credential key: not an uncompressed P-256 point".into(),
            ));
        }
        Ok(ClientPublicKey { raw })
    }
}

impl PublicKeyData for ClientPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// How a client decides to trust a controller.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The CA certificate, PEM (admin.yaml, an enrolled node).
    Ca(String),
    /// Only the CA's fingerprint (a join token).
    Fingerprint(String),
}

/// A client's certificate and key, PEM.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The certificate the CA issued.
    pub cert_pem: String,
    /// The private key.
    pub key_pem: String,
}

/// The TLS configuration of a client (the CLI or a daemon).
pub fn client_config(
    trust: &Trust,
    identity: Option<&Identity>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?;
    let builder = match trust {
        Trust::Ca(pem) => {
            let mut roots = RootCertStore::empty();
            roots
                .add(cert_der(pem)?)
                .map_err(|e| TlsError(format!("CA certificate: {e}")))?;
            builder.with_root_certificates(roots)
        }
        Trust::Fingerprint(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCa {
                fingerprint: fp.to_ascii_lowercase(),
                provider,
            })),
    };
    let mut cfg = match identity {
        Some(id) => {
            let chain = vec![cert_der(&id.cert_pem)?];
            let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
                .map_err(|e| TlsError(format!("credential key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError(format!("credential: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The TLS configuration of a controller: its certificate chain (server certificate, then the
/// CA, so that token holders can pin it), and client certificates verified against the CA but
/// optional, so that a join (token only) gets through TLS and is judged by the API.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    roots
        .add(cert_der(ca_pem)?)
        .map_err(|e| TlsError(format!("CA certificate: {e}")))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError(format!("server key: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert_der(cert_pem)?, cert_der(ca_pem)?], key)
        .map_err(|e| TlsError(format!("server certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Trusts a server whose chain carries a CA with the pinned fingerprint and verifies under it.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the controller's CA does not match the token's fingerprint".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_round_trip_and_junk_is_refused() {
        let k = CredentialKey::generate().unwrap();
        let p = k.public();
        assert_eq!(ClientPublicKey::from_base64(&p.to_base64()).unwrap(), p);
        assert!(ClientPublicKey::from_base64("AAAA").is_err());
        let b = base64::engine::general_purpose::STANDARD.encode([5u8; 65]);
        assert!(
            ClientPublicKey::from_base64(&b).is_err(),
            "not an uncompressed point"
        );
    }

    #[test]
    fn a_reloaded_ca_issues_certificates_under_the_same_name() {
        let ca = Ca::generate().unwrap();
        let again = Ca::load(&ca.cert_pem, &ca.key_pem).unwrap();
        assert_eq!(ca.fingerprint().unwrap(), again.fingerprint().unwrap());
        let (cert, key) = again.server_cert(&["127.0.0.1".into()]).unwrap();
        // The server configuration accepts the chain, which also checks the key matches.
        server_config(&ca.cert_pem, &cert, &key).unwrap();
        let k = CredentialKey::generate().unwrap();
        let c = ca.client_cert("web-1", &k.public()).unwrap();
        client_config(
            &Trust::Ca(ca.cert_pem.clone()),
            Some(&Identity {
                cert_pem: c,
                key_pem: k.pem(),
            }),
        )
        .unwrap();
    }
}
